"""`ondevice chat` driven through a real pseudo-terminal: readline, Ctrl-C, Ctrl-D and the /commands, as a person
types them. The real SmolLM2 is used because a reply must still be streaming when Ctrl-C arrives (the tiny random
models hit their 256-token window in a blink)."""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pty = pytest.importorskip("pty")  # POSIX only


class Terminal:
    """A child process on a pty; `expect` waits for text in what it has printed since the last match."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: its controlling terminal is the pty, so \x03 becomes SIGINT
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.pid, self.fd = pid, fd
        self.buffer = ""
        self.seen = ""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")
        self.buffer += text
        self.seen += text
        return True

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Everything printed up to and including `text`; the buffer keeps what came after."""
        end = time.monotonic() + timeout
        while text not in self.buffer:
            if time.monotonic() > end or not self._read(min(0.1, max(0.0, end - time.monotonic()))):
                if text in self.buffer:
                    break
                raise AssertionError(f"did not see {text!r}; the terminal showed:\n{self.seen[-3000:]}")
        head, _, tail = self.buffer.partition(text)
        self.buffer = tail
        return head + text

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def ctrl_c_at_prompt(self) -> None:
        # A pause first, as a person makes: CPython's readline loop misses a SIGINT that lands while it is still
        # handling the previous key (it only looks at signals when select() is interrupted).
        time.sleep(0.3)
        self.send("\x03")

    def wait(self, timeout: float = 30.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05) and select.select([self.fd], [], [], 0)[0]:
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._read(0.05)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"chat did not exit; the terminal showed:\n{self.seen[-3000:]}")


@pytest.fixture
def chat(smollm2: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONDEVICE_CACHE": str(tmp_path / "cache"), "TERM": "xterm"}
    env.pop("ONDEVICE_CI", None)
    terminals: list[Terminal] = []

    def start(*extra: str) -> Terminal:
        # -n 1500: a reply that would run for many seconds, so Ctrl-C surely lands in the middle of it.
        term = Terminal(["-m", "ondevice", "chat", str(smollm2), "-n", "1500", "--ctx", "2048", "--seed", "1",
                         *extra], env, tmp_path)
        terminals.append(term)
        term.expect("chatting with")
        term.expect("> ")
        return term

    yield start
    for term in terminals:  # a failed assertion must not leave a model decoding in the background
        try:
            os.kill(term.pid, 9)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.slow
def test_chat_in_a_terminal(chat, tmp_path: Path) -> None:
    term = chat()
    term.send("Write a long story about a dragon who learns to bake bread.\r")
    term.expect("bread.\n")  # the echo of the typed line
    reply = ""
    while len(reply.strip()) < 40:  # the reply is streaming
        reply += term.expect(" ", timeout=60)
    term.send("\x03")
    sent = time.monotonic()
    term.expect("(stopped)", timeout=10)
    term.expect("> ", timeout=10)
    assert time.monotonic() - sent < 10  # the reply stopped; it did not run on to its 1500 tokens

    term.send("And then?\r")  # the session goes on from the partial reply (the KV cache stayed consistent)
    term.expect("then?\n")
    reply = ""
    while len(reply.strip()) < 10:
        reply += term.expect(" ", timeout=60)
    term.send("\x03")
    term.expect("(stopped)", timeout=10)
    term.expect("> ", timeout=10)

    term.send("/help\r")
    assert "/save FILE" in term.expect("> ")
    term.send("/bogus\r")
    assert "unknown command /bogus; /help lists the commands" in term.expect("> ")

    term.send("/save saved.json\r")
    term.expect("(saved 4 messages to saved.json)")
    saved = json.loads((tmp_path / "saved.json").read_text())
    user, assistant, again, _ = saved["messages"]
    assert again == {"role": "user", "content": "And then?"}
    assert user == {"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}
    assert assistant["role"] == "assistant" and assistant["content"].strip()  # the partial reply is kept
    assert not list(tmp_path.glob(".saved.json.*"))  # written atomically: no temporary left behind

    term.send("/reset\r")
    term.expect("clear the conversation? [y/N] ")
    term.send("n\r")
    term.expect("(kept the conversation)")
    term.send("/reset\r")
    term.expect("[y/N] ")
    term.send("y\r")
    term.expect("(conversation cleared)")
    term.send("/system Answer in one word.\r")
    term.expect("(system prompt set; new conversation)")
    term.send("/save saved.json\r")
    term.expect("(saved 1 message to saved.json)")
    assert json.loads((tmp_path / "saved.json").read_text())["messages"] == [
        {"role": "system", "content": "Answer in one word."}]

    term.expect("> ")
    term.ctrl_c_at_prompt()  # at an empty prompt: a hint, not an exit
    term.expect("Ctrl-C again or Ctrl-D to quit")
    term.expect("> ")
    term.send("\x04")  # Ctrl-D quits, and the shell prompt would start on a fresh line
    assert term.wait() == 0
    assert term.seen.endswith("> \n"), repr(term.seen[-40:])
    assert (tmp_path / "cache" / "chat_history").stat().st_mode & 0o077 == 0  # private to the user
    history = (tmp_path / "cache" / "chat_history").read_text()
    assert "dragon who learns to bake bread" in history and "/system Answer in one word." in history


@pytest.mark.slow
def test_chat_ctrl_c_twice_quits_and_a_typed_line_is_only_discarded(chat) -> None:
    term = chat()
    term.send("half a thought")
    term.expect("half a thought")
    term.ctrl_c_at_prompt()  # a typed line: Ctrl-C discards it, like a shell, and does not arm the exit
    term.expect("> ")
    term.ctrl_c_at_prompt()
    term.expect("Ctrl-C again or Ctrl-D to quit")
    term.expect("> ")
    term.ctrl_c_at_prompt()
    assert term.wait() == 0


@pytest.mark.slow
def test_chat_from_a_pipe(smollm2: Path, tmp_path: Path) -> None:
    """Without a terminal: no prompt, no readline, /reset needs no answer (nobody is there to give one)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONDEVICE_CACHE": str(tmp_path / "cache")}
    lines = "/system Be brief.\nSay hello.\n/save a.json\n/bogus\n/reset\n/save b.json\n"
    proc = subprocess.run([sys.executable, "-m", "ondevice", "chat", str(smollm2), "-n", "16", "--seed", "1"],
                          input=lines, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "unknown command /bogus" in proc.stderr and "> " not in proc.stdout
    roles = [m["role"] for m in json.loads((tmp_path / "a.json").read_text())["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert json.loads((tmp_path / "b.json").read_text())["messages"] == [{"role": "system", "content": "Be brief."}]
    assert not (tmp_path / "cache" / "chat_history").exists()  # piped lines are not the user's typing history


@pytest.mark.slow
def test_chat_keeps_the_session_after_an_error(smollm2: Path, tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONDEVICE_CACHE": str(tmp_path / "cache")}
    lines = "word " * 100 + "\n/save c.json\n"  # the first message does not fit in --ctx 64
    proc = subprocess.run([sys.executable, "-m", "ondevice", "chat", str(smollm2), "--ctx", "64"], input=lines,
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "context window" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "c.json").read_text())["messages"] == []  # the failed turn was dropped
