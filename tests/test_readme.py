"""The README's commands stay true: CI runs the test command verbatim, and every command of "Using it" runs as
written, in order, after the set-up command, in a scratch folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks(text: str, language: str = "bash") -> list[str]:
    parts = text.split(f"```{language}\n")[1:]
    return [p.split("```", 1)[0].strip() for p in parts]


USING_IT = README.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]


def _using_it_commands() -> list[str]:
    [block] = _bash_blocks(USING_IT)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks(README)
    test_command = blocks[1]
    assert "pytest" in test_command and "\n" not in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_main_command_uses_the_bundled_default():
    blocks = _bash_blocks(README)
    assert "smollm2-135m-instruct" in blocks[0] and blocks[0].startswith("pip install .")


def test_using_it_uses_only_files_the_set_up_or_an_earlier_command_makes():
    """Static check (fast tier): every local path a command reads was made by the set-up or an earlier command,
    or is in the checkout (the set-up's `pip install .` runs in it)."""
    from ondevice.hub import MODELS

    made = {"smol.gguf"}  # the set-up's -o
    assert "-o smol.gguf" in _bash_blocks(README)[0]
    for command in _using_it_commands():
        words = command.split("#", 1)[0].split()
        outputs = {words[i + 1].strip("./").rstrip("/") for i, w in enumerate(words) if w == "-o"}
        for i, word in enumerate(words):
            if i and words[i - 1] in ("-o", "--device", "--app", "--format", "--to", "--quant", "-p", "-n",
                                      "--port", "--gen", "--repeat", "--temp"):
                continue
            name = word.strip("./").rstrip("/")
            looks_local = word.startswith("./") or name.endswith((".gguf", ".json", ".pte", ".mlpackage")) or \
                name.startswith(("smol", "Smol", "SmolLM2"))
            if looks_local and name not in made | set(MODELS) and not (ROOT / name).exists():
                pytest.fail(f"{command!r} reads {word}, which neither the set-up nor an earlier command makes")
        made |= outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command: str, cwd: Path, env: dict[str, str]) -> None:
    """A server runs until stopped: start it, fetch its page, then Ctrl-C it as a user would."""
    port = _free_port()  # 8080 may be taken on a shared machine; the rest of the command runs as written
    assert "--port 8080" in command
    proc = subprocess.Popen(["bash", "-c", "exec " + command.replace("--port 8080", f"--port {port}")], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"{command!r} exited: {proc.communicate()[1][-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    assert resp.status == 200 and b"<html" in resp.read(4096).lower()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{command!r}: no page in time"
                time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_using_it_commands_run_as_written(smollm2: Path, tmp_path: Path) -> None:
    """The set-up command (less its `pip install .`), then every "Using it" command, in order, with `ondevice`
    being this checkout's CLI. Needs the real model and every target's package: slow (about 20 minutes here, most of it the ExecuTorch and Core ML exports)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")  # the checkout the user stands in after `pip install .`
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ondevice"  # what the installed console script does, for this tree
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m ondevice \"$@\"\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ONDEVICE_CI"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT),
               XDG_DATA_HOME=str(tmp_path / "data"))  # bench/report/eval use a store of their own, not the user's
    setup = _bash_blocks(README)[0]
    assert setup.startswith("pip install . && ")
    commands = [setup.removeprefix("pip install . && ")] + _using_it_commands()
    outputs: dict[str, str] = {}
    for command in commands:
        started = time.monotonic()
        if " serve " in command:
            _serve(command, work, env)
        else:
            stdin = "What is the capital of France?\n" if " chat " in command else ""
            run = subprocess.run(["bash", "-c", command], cwd=work, env=env, input=stdin, capture_output=True,
                                 text=True, timeout=1800)
            assert run.returncode == 0, f"{command!r} failed ({run.returncode}): {run.stderr[-3000:]}"
            assert "Traceback" not in run.stderr, run.stderr[-3000:]
            outputs[command] = run.stdout
        print(f"{time.monotonic() - started:6.1f} s  {command.split('#')[0].strip()}")

    for name in ("smol.gguf", "smol-q8.gguf", "smol-q6.gguf", "smol-4bit.gguf", "SmolLM2-135M-Instruct/config.json",
                 "smol-mlx/config.json", "smol-onnx/genai_config.json", "smol.pte", "Smol.mlpackage",
                 "report/report.md", "bundle", "bundle-ios"):
        assert (work / name).exists(), name
    by_start = {c.split("#")[0].strip(): out for c, out in outputs.items()}
    assert json.loads(by_start["ondevice inspect smol.gguf --json"])
    schema_run = next(out for c, out in by_start.items() if "--json-schema" in c)
    assert set(json.loads(schema_run)) >= {"title", "type"}, schema_run
    assert "ESTIMATE" in by_start["ondevice fit smol.gguf --device iphone-15-pro"]


def test_using_it_python_runs_as_written(smollm2: Path, tmp_path: Path) -> None:
    """The section's Python example, as a script: it streams a reply and prints the stats as JSON text."""
    [code] = _bash_blocks(USING_IT, "python")
    env = {k: v for k, v in os.environ.items() if k != "ONDEVICE_CI"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    *reply, stats = run.stdout.splitlines()
    assert "".join(reply).strip() and json.loads(stats)["finish_reason"] in ("stop", "length"), run.stdout
