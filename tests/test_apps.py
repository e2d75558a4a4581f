"""Apps: the browser chat page in headless Chromium against a real `ondevice serve`, the in-browser page running an
ONNX export with onnxruntime-web (network blocked but for loopback), the desktop app offscreen, and the phone
samples' manifest fields against the manifest schema.

Screenshots go to a temporary folder, or to $ONDEVICE_SCREENSHOTS when set (docs/img/ is made that way).
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import unavailable

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((ROOT / "ondevice" / "data" / "schemas" / "app-bundle-manifest.v2.schema.json").read_text())


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

    # No network but loopback: every other host fails to resolve, and IP literals go to a dead proxy.
    OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"]

    def __init__(self, binary: str, extra_flags: tuple[str, ...] | list[str] = ()) -> None:
        self.events: list[dict[str, Any]] = []  # CDP events seen while waiting for replies
        self.profile = tempfile.mkdtemp(prefix="ondevice-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        def pipe_fds() -> None:  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # move out of the way first: no clobbering
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, *extra_flags, f"--user-data-dir={self.profile}", "about:blank"],
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
            if "method" in reply and len(self.events) < 10_000:
                self.events.append(reply)
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
    browser = Chromium(chromium_binary())
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
        from ondevice.runtime.sampling import DEFAULTS

        # The inputs hold the server's defaults (web-config.json), not numbers of the page's own.
        shown = browser.evaluate("['temperature', 'repeat_penalty', 'max_tokens'].map((id) => "
                                 "Number(document.getElementById(id).value))")
        assert shown == [DEFAULTS.temperature, DEFAULTS.repeat_penalty, DEFAULTS.max_tokens]
        browser.screenshot(screenshot_dir(tmp_path) / "web-chat.png")
    finally:
        browser.close()


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        unavailable("chromium is not installed (apt-get install -y chromium)")
    return binary


# ---------------------------------------------------------------------- in-browser mode (onnxruntime-web)
WEB = ROOT / "apps" / "web"


def test_vendored_web_runtime_is_what_fetch_sh_recorded() -> None:
    record = json.loads((WEB / "vendor" / "VENDORED.json").read_text())
    import hashlib

    for rel, digest in record["files"].items():
        assert hashlib.sha256((WEB / "vendor" / rel).read_bytes()).hexdigest() == digest, rel
    assert {"onnxruntime-web/LICENSE", "tokenizers/LICENSE", "jinja/LICENSE"} <= set(record["files"])
    size = sum((WEB / "vendor" / rel).stat().st_size for rel in record["files"])
    assert size < 30e6, f"vendored web runtime grew to {size / 1e6:.1f} MB"
    # The pages load only what is shipped: no absolute URLs to other hosts.
    for page in ("index.html", "inbrowser.html", "onnx-chat.js", "onnx-worker.js"):
        assert not re.search(r"""(?:src|href|from|import|fetch)\s*\(?\s*["']https?://""", (WEB / page).read_text()), page


def test_wheel_ships_every_web_file() -> None:
    """apps/web installs as ondevice/web (setup.py maps it); pyproject's package-data globs must cover every file
    the pages load, or a non-editable install serves a broken page (checked by hand with a venv, see README)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ondevice.web"]
    assert '"ondevice.web": "apps/web"' in (ROOT / "setup.py").read_text()
    files = [p.relative_to(WEB).as_posix() for p in WEB.rglob("*") if p.is_file() and p.name != "fetch.sh"]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert files and not missing, missing


def test_serve_onnx_rejects_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    run = subprocess.run([sys.executable, "-m", "ondevice", "serve", "--onnx", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "not an ONNX folder" in run.stderr and run.stderr.count("\n") == 1, run.stderr


def serve_onnx_only(folder: Path) -> Any:
    from ondevice.server import create_server

    server = create_server(None, "127.0.0.1", 0, onnx_dir=folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# What a person would notice, recorded in the page from its first script on: a 10 ms timer that cannot fire while
# the page's thread is busy (a frozen tab), and when each click reached the page.
WATCH_PAGE = """
window.__ticks = []; window.__clicks = [];
setInterval(() => window.__ticks.push(performance.now()), 10);
addEventListener("click", () => window.__clicks.push(performance.now()), true);
"""


def open_in_browser_page(url: str) -> Chromium:
    browser = Chromium(chromium_binary(), Chromium.OFFLINE)
    browser.page("Network.enable")
    browser.page("Page.enable")
    browser.page("Page.addScriptToEvaluateOnNewDocument", source=WATCH_PAGE)
    browser.page("Page.navigate", url=url)
    return browser


def page_state(browser: Chromium) -> dict[str, Any]:
    return browser.evaluate("window.ondevice ? JSON.parse(JSON.stringify(window.ondevice)) : null") or {}


def wait_for_reply(browser: Chromium, timeout: float, done: Any = lambda s: s.get("last")) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = page_state(browser)
        if done(state) or state.get("error"):
            break
        time.sleep(0.1)
    return state


def longest_freeze_ms(browser: Chromium, timing: dict[str, float]) -> float:
    """The longest time the page's thread went without running its 10 ms timer while the reply streamed."""
    ticks = browser.evaluate("window.__ticks")
    inside = [t for t in ticks if timing["first"] <= t <= timing["done"]]
    marks = [timing["first"], *inside, timing["done"]]
    return max(b - a for a, b in zip(marks, marks[1:], strict=False))


def click(browser: Chromium, element_id: str) -> None:
    """A real mouse click (press and release at the element's centre), as a person's."""
    x, y = browser.evaluate(f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect(); "
                            "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        browser.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def run_in_browser_page(url: str, tmp_path: Path, *, timeout: float, shot: str | None = None) -> tuple[dict, list]:
    """Open the in-browser page offline, wait for its reply; returns (window.ondevice, URLs requested), with
    state["freeze_ms"]: the longest the page went without running a timer while the reply streamed."""
    browser = open_in_browser_page(url)
    try:
        state = wait_for_reply(browser, timeout)
        if shot:
            browser.screenshot(screenshot_dir(tmp_path) / shot)
        if state.get("last"):
            state["freeze_ms"] = longest_freeze_ms(browser, state["timing"])
        state["status"] = browser.evaluate("document.getElementById('status').textContent")
        state["meta"] = browser.evaluate("(document.querySelector('.msg.assistant .meta') || {}).textContent")
        urls = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
        return state, urls
    finally:
        browser.close()


def test_in_browser_chat_matches_onnxruntime_greedy(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The tiny model's int4 ONNX export, run in headless Chromium by onnxruntime-web with the network blocked:
    the streamed reply equals onnxruntime's (Python) greedy continuation, token for token."""
    pytest.importorskip("onnxruntime")
    from ondevice.converters import onnx as onnx_target

    from ondevice.runners.onnx_runner import ONNXRunner
    from ondevice.sources import open_source

    binary_needed = chromium_binary()  # skip early, before converting
    assert binary_needed
    folder = tmp_path / "tiny-onnx"
    source = open_source(tiny_models["llama"])
    try:
        onnx_target.convert(source, folder, onnx_target.ONNXOptions(quant="int4", progress=False))
    finally:
        source.close()
    question, n = "Hello, how are you?", 64
    server = serve_onnx_only(folder)
    try:
        # The reference: onnxruntime (Python) on exactly the graph the page gets (MatMulNBits rewritten to a
        # float Gemm for onnxruntime-web, see ondevice/server/browser_onnx.py), greedy.
        served = tmp_path / "served"
        shutil.copytree(folder, served)
        with urllib.request.urlopen(f"{server.url}/model/model.onnx") as resp:
            graph = resp.read()
        assert graph != (folder / "model.onnx").read_bytes() and b"MatMulNBits" not in graph
        (served / "model.onnx").write_bytes(graph)
        runner = ONNXRunner(served, threads=2)
        prompt = runner.chat_tokens([{"role": "user", "content": question}])
        expected = runner.greedy(prompt, n, stop_ids=runner.eos_ids)
        if expected and expected[-1] in runner.eos_ids:
            expected = expected[:-1]
        expected_text = runner.decode(expected)
        assert len(expected) >= 40, expected  # a reply long enough to stream (and to see a frozen tab)
        original = ONNXRunner(folder, threads=2).logits(prompt)  # the rewrite computes the same function
        assert np.abs(runner.logits(prompt) - original).max() < 0.25 * original.std()

        # Server side of the in-browser mode: no server-side model, the folder under /model/, the page at /.
        with urllib.request.urlopen(f"{server.url}/") as resp:
            assert b"onnx-worker.js" in resp.read() and resp.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(f"{server.url}/model/genai_config.json") as resp:
            assert json.loads(resp.read())["model"]["decoder"]["filename"] == "model.onnx"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.url}/v1/models")
        assert err.value.code == 404 and "in the browser" in json.loads(err.value.read())["error"]["message"]
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{server.url}/model/../../etc/passwd")

        query = urllib.parse.urlencode({"q": question, "max_tokens": n, "temperature": 0, "repeat_penalty": 1})
        state, urls = run_in_browser_page(f"{server.url}/?{query}", tmp_path, timeout=120)
    finally:
        server.close()
    assert not state.get("error"), state
    assert state.get("last"), f"no reply in time: {state}"
    assert state["last"]["prompt"] == prompt, "tokenizers.js + jinja built another prompt than Python"
    assert state["last"]["ids"] == expected, (state["last"]["ids"], expected)
    assert state["last"]["reply"] == expected_text
    assert state["updates"] >= 3, "the reply did not stream"
    # The tab stays live while the model runs (in a Web Worker): its timers keep firing during the reply.
    streamed_ms = state["timing"]["done"] - state["timing"]["first"]
    print(f"in-browser reply streamed for {streamed_ms:.0f} ms; longest freeze {state['freeze_ms']:.0f} ms")
    assert streamed_ms > 150, "the reply was too short to tell a live tab from a frozen one"
    assert state["freeze_ms"] < min(250, streamed_ms / 2), f"the page froze for {state['freeze_ms']:.0f} ms"
    assert re.match(r"\d+ tokens, [\d.]+ s", state["meta"] or ""), state["meta"]
    foreign = [u for u in urls if not u.startswith(server.url) and not u.startswith(("data:", "blob:"))]
    assert urls and not foreign, f"the page fetched from elsewhere than the server: {foreign}"


@pytest.mark.slow
def test_in_browser_chat_smollm2_int4_screenshot(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct int4 ONNX in the browser (offline): a coherent streamed reply, and the screenshot
    docs/img/web-inbrowser.png (ONDEVICE_SCREENSHOTS=docs/img)."""
    pytest.importorskip("onnx")
    chromium_binary()
    from ondevice.converters import onnx as onnx_target

    from ondevice.sources import open_source

    folder = tmp_path / "SmolLM2-135M-Instruct-int4-onnx"
    source = open_source(smollm2)
    try:
        onnx_target.convert(source, folder, onnx_target.ONNXOptions(quant="int4", progress=False))
    finally:
        source.close()
    server = serve_onnx_only(folder)
    try:
        query = urllib.parse.urlencode({"q": "Give me three tips for staying healthy.", "max_tokens": 96,
                                        "temperature": 0})
        browser = open_in_browser_page(f"{server.url}/?{query}")
        try:
            state = wait_for_reply(browser, 400)
            browser.screenshot(screenshot_dir(tmp_path) / "web-inbrowser.png")
            assert not state.get("error"), state
            reply = state["last"]["reply"]
            assert any(w in reply.lower() for w in ("exercise", "water", "sleep", "diet", "healthy")), reply
            # What a person sees during a reply of seconds: the page's timers kept running (no frozen tab).
            freeze = longest_freeze_ms(browser, state["timing"])
            streamed_ms = state["timing"]["done"] - state["timing"]["first"]
            assert streamed_ms > 1000 and freeze < 250, (streamed_ms, freeze)

            # A second message, typed and sent with the mouse; a Stop click mid-reply ends it at once.
            browser.evaluate("document.getElementById('max_tokens').value = 400")
            click(browser, "prompt")
            browser.page("Input.insertText", text="Write a long story about a dragon who learns to bake bread.")
            updates = state["updates"]
            click(browser, "send")
            state = wait_for_reply(browser, 300, lambda s: s.get("updates", 0) >= updates + 3)
            assert browser.evaluate("document.getElementById('send').textContent") == "Stop"
            clicks = len(browser.evaluate("window.__clicks"))
            click(browser, "send")
            state = wait_for_reply(browser, 60, lambda s: (s.get("last") or {}).get("finish") == "stopped")
            clicked_at = browser.evaluate("window.__clicks")[clicks]
            assert state["last"]["finish"] == "stopped", state
            assert state["timing"]["done"] - clicked_at < 2000, "the reply went on after Stop"
            assert 3 <= len(state["last"]["ids"]) < 400
            meta = browser.evaluate("[...document.querySelectorAll('.msg.assistant .meta')].pop().textContent")
            assert "(stopped)" in meta and browser.evaluate("document.getElementById('send').textContent") == "Send"
            urls = [e["params"]["request"]["url"] for e in browser.events
                    if e["method"] == "Network.requestWillBeSent"]
        finally:
            browser.close()
        # HEAD (link checkers, curl -I) gets the page's headers, not 501.
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("HEAD", "/")
        head = conn.getresponse()
        assert head.status == 200 and int(head.headers["Content-Length"]) > 0 and head.read() == b""
        conn.close()
    finally:
        server.close()
    assert all(u.startswith(server.url) or u.startswith(("data:", "blob:")) for u in urls)


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


def _desktop_module() -> Any:
    import importlib.util

    pytest.importorskip("PySide6")
    spec = importlib.util.spec_from_file_location("ondevice_chat", ROOT / "apps" / "desktop" / "ondevice_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_desktop_app_names_the_missing_xcb_packages(monkeypatch, capsys) -> None:
    """Qt's xcb plugin aborts without libxcb-cursor0/-icccm4/-keysyms1: the app says so in one line first."""
    app = _desktop_module()
    assert set(app.XCB_LIBRARIES.values()) == {"libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1"}
    # The same packages .ci/run installs for the desktop test, so there they load.
    assert all(p in (ROOT / ".ci" / "run").read_text() for p in app.XCB_LIBRARIES.values())
    installed = not app.missing_xcb_packages()
    # A library that is not on this machine stands for one that is missing (a real dlopen, as Qt's).
    monkeypatch.setitem(app.XCB_LIBRARIES, "libondevice-not-here.so.9", "libondevice-not-here9")
    assert app.missing_xcb_packages()[-1] == "libondevice-not-here9" and installed == (
        app.missing_xcb_packages() == ["libondevice-not-here9"])
    assert app.xcb_problem({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert app.xcb_problem({"WAYLAND_DISPLAY": "wayland-0"}) is None
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    assert app.main([]) == 1  # before any QApplication exists
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sudo apt-get install" in err and "libondevice-not-here9" in err, err


@pytest.mark.slow
def test_desktop_stop_finalizes_the_reply_stats(smollm2: Path) -> None:
    """What the Stop button does (stop_requested, then stream.close()): the reply's stats are final, not zeros."""
    app = _desktop_module()
    backend = app.ChatBackend()
    pieces: list[str] = []
    outcome: dict[str, Any] = {}

    def on_piece(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 8:
            backend.stop_requested.set()  # the button's slot

    backend.piece.connect(on_piece)
    backend.finished.connect(outcome.update)
    backend.failed.connect(lambda message: outcome.update(error=message))
    backend.load(str(smollm2))
    try:
        backend.generate([{"role": "user", "content": "Count from one to fifty in words."}],
                         {"temperature": 0.0, "max_tokens": 200})
        stats = backend.model.last_stats
        assert "error" not in outcome and outcome["finish"] == "stopped" == stats.finish_reason, outcome
        assert 8 <= outcome["tokens"] == stats.generated_tokens < 200 and len(pieces) == 8
        assert outcome["tok_s"] == stats.decode_tok_s > 0 and stats.prefill_tok_s > 0 and stats.decode_s > 0
    finally:
        backend.model.close()
