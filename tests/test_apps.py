"""Apps: the browser chat page in headless Chromium against a real `ondevice serve`, the desktop app offscreen,
and the phone samples' manifest fields against the manifest schema.

Screenshots go to a temporary folder, or to $ONDEVICE_SCREENSHOTS when set (docs/img/ is made that way).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((ROOT / "ondevice" / "data" / "schemas" / "app-bundle-manifest.v1.schema.json").read_text())


def screenshot_dir(tmp_path: Path) -> Path:
    target = os.environ.get("ONDEVICE_SCREENSHOTS")
    return Path(target) if target else tmp_path


# ---------------------------------------------------------------------- phone samples vs the schema
def _schema_keys(schema: dict[str, Any]) -> set[str]:
    keys: set[str] = set()
    for name, sub in schema.get("properties", {}).items():
        keys.add(name)
        keys |= _schema_keys(sub)
        if isinstance(sub.get("items"), dict):
            keys |= _schema_keys(sub["items"])
    return keys


def test_swift_sample_decodes_only_schema_fields() -> None:
    source = (ROOT / "apps" / "ios" / "OndeviceChat" / "BundleManifest.swift").read_text()
    fields = set(re.findall(r"\blet (\w+): ", source))
    assert {"manifest_version", "recommended_context", "eos_tokens", "top_k", "estimate_bytes"} <= fields
    unknown = fields - _schema_keys(SCHEMA)
    assert not unknown, f"Swift decodes fields the manifest schema does not define: {unknown}"


def test_kotlin_sample_reads_only_schema_fields() -> None:
    source = (ROOT / "apps" / "android" / "app" / "src" / "main" / "java" / "dev" / "ondevice" / "chat" /
              "BundleManifest.kt").read_text()
    keys = set(re.findall(r'(?:get|opt)(?:Int|String|Boolean|Double|Long|JSONObject|JSONArray)?\("(\w+)"', source))
    keys |= set(re.findall(r'isNull\("(\w+)"\)', source))
    assert {"manifest_version", "files", "role", "eos_tokens", "estimate_bytes"} <= keys
    unknown = keys - _schema_keys(SCHEMA)
    assert not unknown, f"Kotlin reads keys the manifest schema does not define: {unknown}"
    roles = set(re.findall(r'fileWithRole\("(\w+)"\)', source))
    assert roles <= set(SCHEMA["properties"]["files"]["items"]["properties"]["role"]["enum"])


# ---------------------------------------------------------------------- headless Chromium over CDP
class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe (CDP as NUL-separated JSON on fds 3/4)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--remote-debugging-pipe", "--window-size=1000,700",
             "--hide-scrollbars"]

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="ondevice-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        def pipe_fds() -> None:  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # move out of the way first: no clobbering
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pipe_fds,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the debugging pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served(smollm2: Path) -> Iterator[Any]:
    import ondevice
    from ondevice.server import create_server

    model = ondevice.load(smollm2, n_ctx=1024)
    server = create_server(model, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.close()
    thread.join(5)
    model.close()


@pytest.mark.slow
def test_browser_chat_streams_a_reply(served: Any, tmp_path: Path) -> None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    browser = Chromium(binary)
    try:
        browser.page("Page.navigate", url=f"{served.url}/?q=Write%20a%20short%20poem%20about%20the%20sea.")
        bubble = "document.querySelector('.msg.assistant')"
        lengths: list[int] = []
        deadline = time.monotonic() + 90
        done = False
        while time.monotonic() < deadline:
            state = browser.evaluate(f"({bubble} ? [{bubble}.firstChild ? {bubble}.firstChild.textContent.length "
                                     f": 0, !!{bubble}.querySelector('.meta')] : null)")
            if state:
                lengths.append(state[0])
                if state[1]:
                    done = True
                    break
            time.sleep(0.05)
        assert done, f"no complete reply in time (lengths seen: {lengths[-5:]})"
        partial = sorted({n for n in lengths if n > 0})
        assert len(partial) >= 3, f"the reply did not stream: lengths seen {partial}"  # grew in steps
        reply = browser.evaluate(f"{bubble}.firstChild.textContent")
        meta = browser.evaluate(f"{bubble}.querySelector('.meta').textContent")
        assert reply.strip() and re.match(r"\d+ tokens, [\d.]+ s", meta), (reply, meta)
        assert browser.evaluate("document.getElementById('model').textContent") == served.model_id
        browser.screenshot(screenshot_dir(tmp_path) / "web-chat.png")
    finally:
        browser.close()


# ---------------------------------------------------------------------- desktop app, offscreen
@pytest.mark.slow
def test_desktop_app_streams_schema_valid_json_offscreen(smollm2: Path, tmp_path: Path) -> None:
    pytest.importorskip("PySide6")
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = ROOT / "examples" / "github_issue.schema.json"
    shot = screenshot_dir(tmp_path) / "desktop-chat.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "desktop" / "ondevice_chat.py"), str(smollm2),
         "--schema", str(schema_path), "--prompt", "The app crashes when I upload a photo larger than 10 MB.",
         "--screenshot", str(shot), "--timeout", "150"],
        capture_output=True, text=True, timeout=200, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["finish"] == "stop" and outcome["tokens"] > 5
    jsonschema.validate(json.loads(outcome["reply"]), json.loads(schema_path.read_text()))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
