"""`ondevice chat [MODEL]`: an interactive multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

COMMANDS_HELP = """\
commands:
  /help          this list
  /reset         clear the conversation (asks first)
  /system TEXT   set the system prompt and start a new conversation (/system alone shows it)
  /save FILE     write the conversation as JSON to FILE (replaces FILE)
  /exit          quit (or Ctrl-D; Ctrl-C twice at the prompt)
keys: Ctrl-C during a reply stops it (the partial reply stays in the conversation);
      arrow keys edit the line and walk the history (kept in ondevice's cache folder)."""

DESCRIPTION = """\
Chat with a model in the terminal. Earlier turns stay in the KV cache, so each reply starts fast.

""" + COMMANDS_HELP

HISTORY_LENGTH = 1000


def register(sub: argparse._SubParsersAction) -> None:
    from ondevice.cli.run import add_sampling_args

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="GGUF file or alias (default: smollm2-135m-instruct)")
    p.add_argument("--timings", action="store_true", help="print a timing line after each reply")
    add_sampling_args(p)
    p.set_defaults(handler=run)


def history_path() -> Path:
    from ondevice.hub import cache_dir

    return cache_dir() / "chat_history"


def _setup_readline() -> Any:
    """Line editing and a persistent history; None where readline is missing (Windows)."""
    try:
        import readline
    except ImportError:
        return None
    path = history_path()
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, PermissionError, OSError):
        pass  # first run, or an unreadable file: start with an empty history
    readline.set_history_length(HISTORY_LENGTH)
    return readline


def _save_history(readline: Any) -> None:
    if readline is None:
        return
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
        os.chmod(path, 0o600)  # what people type to a model can be private: readable by this user only
    except OSError as exc:  # a read-only cache must not turn a clean exit into an error
        print(f"ondevice: could not save the chat history to {path}: {exc}", file=sys.stderr)


def save_conversation(path: Path, model_path: str, messages: list[dict[str, str]]) -> None:
    from ondevice.formats.atomic import atomic_output

    data = {"model": str(model_path), "messages": messages}
    with atomic_output(path, force=True) as tmp:  # the user named the file: replacing it is what they asked
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class Chat:
    """The REPL state: the conversation, the system prompt and what Ctrl-C at the prompt means next."""

    def __init__(self, model: Any, args: argparse.Namespace, interactive: bool) -> None:
        self.model = model
        self.args = args
        self.interactive = interactive
        self.system: str | None = args.system
        self.messages: list[dict[str, str]] = self._fresh()
        self.readline: Any = None  # set by run() when the terminal has line editing

    def _fresh(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _say(self, text: str) -> None:
        print(text, file=sys.stderr)

    def _confirm(self, question: str) -> bool:
        if not self.interactive:  # piped input has nobody to answer: do what the line asked
            return True
        try:
            return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            print()
            return False

    def reset(self) -> None:
        self.messages = self._fresh()
        self.model.reset()

    def command(self, text: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self._say(COMMANDS_HELP)
        elif name == "/reset":
            if len(self.messages) == len(self._fresh()):
                self._say("(the conversation is already empty)")
            elif self._confirm("clear the conversation?"):
                self.reset()
                self._say("(conversation cleared)")
            else:
                self._say("(kept the conversation)")
        elif name == "/system":
            if not rest:
                self._say(f"system prompt: {self.system!r}" if self.system else
                          "no system prompt; set one with /system TEXT")
            else:
                self.system = rest
                self.reset()
                self._say("(system prompt set; new conversation)")
        elif name == "/save":
            if not rest:
                self._say("usage: /save FILE")
            else:
                from ondevice.errors import OndeviceError

                path = Path(rest).expanduser()
                try:
                    save_conversation(path, self.model.path, self.messages)
                except (OndeviceError, OSError) as exc:
                    self._say(f"ondevice: could not save: {exc}")
                else:
                    n = len(self.messages)
                    self._say(f"(saved {n} message{'' if n == 1 else 's'} to {path})")
        else:
            self._say(f"unknown command {name}; /help lists the commands")
        return True

    def reply(self, text: str) -> None:
        from ondevice.cli.run import sampling_kwargs, timing_line
        from ondevice.converters.base import peak_rss_mib
        from ondevice.errors import OndeviceError

        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        stream = None
        try:
            stream = self.model.generate(self.messages, **sampling_kwargs(self.args))  # renders the template
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except OndeviceError as exc:  # e.g. the context is full: say so and keep the session
            print(f"\nondevice: {exc}", file=sys.stderr)
            self.messages.pop()
            return
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # finalizes the stats (finish_reason "stopped") if the generator was suspended
            sys.stdout.write("\n")
            self._say("(stopped)")
            # The partial reply is kept as the assistant turn: it is what the user saw and what the KV cache
            # holds, so the next turn continues from the conversation as displayed. Nothing shown: drop the turn.
            if pieces:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.messages.pop()
            return
        sys.stdout.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if self.args.timings:
            self._say(timing_line(self.model.last_stats, peak_rss_mib()))

    def _typed(self) -> bool:
        return self.readline is not None and bool(self.readline.get_line_buffer().strip())

    def loop(self) -> None:
        armed = False  # a Ctrl-C at the prompt was pressed: the next one quits
        prompt = "> " if self.interactive else ""
        while True:
            try:
                line = input(prompt)
            except EOFError:
                if self.interactive:
                    print()  # the shell's prompt starts on a fresh line
                return
            except KeyboardInterrupt:
                print()
                if not self.interactive:
                    return
                if self._typed():  # like a shell: Ctrl-C on a typed line discards the line
                    armed = False
                    continue
                if armed:
                    return
                armed = True
                self._say("(Ctrl-C again or Ctrl-D to quit; /help lists the commands)")
                continue
            armed = False
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.reply(text)


def run(args: argparse.Namespace) -> int:
    import ondevice
    from ondevice.errors import OndeviceError

    model = ondevice.load(args.model, threads=args.threads, n_ctx=args.ctx, kv_cache=args.kv_cache,
                          draft=args.draft)
    if not model.chat_template:
        raise OndeviceError(f"{model.path} has no chat template; use `ondevice run --raw` instead")
    interactive = sys.stdin.isatty()
    chat = Chat(model, args, interactive)
    readline = chat.readline = _setup_readline() if interactive else None
    if interactive:
        print(f"chatting with {model.path} ({model.spec.arch}, {model.threads} threads). "
              "/help for commands, Ctrl-D to quit", file=sys.stderr)
    try:
        chat.loop()
    finally:
        _save_history(readline)
    return 0
