"""ondevice desktop chat: a Qt (PySide6) window that embeds the runtime directly (no server, no network).

    pip install PySide6-Essentials
    python apps/desktop/ondevice_chat.py [MODEL.gguf] [--schema FILE.json]

The model runs on a worker QThread; text pieces reach the window through Qt signals (queued across threads),
so the window stays responsive while tokens stream. Stop ends generation at the next token. With a JSON
schema picked, every reply is JSON valid against it (ondevice.structured).

--prompt TEXT --screenshot OUT.png sends one message, waits for the reply, saves the window and quits (used by
tests/test_apps.py with QT_QPA_PLATFORM=offscreen, and for the screenshot in docs/img/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot
from PySide6.QtWidgets import (
    QApplication,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

# Qt's xcb platform plugin (X11) dlopens these at start and aborts without them; Debian/Ubuntu do not install
# them with PySide6's wheel. soname -> the apt package that provides it.
XCB_LIBRARIES = {"libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
                 "libxcb-keysyms.so.1": "libxcb-keysyms1"}


def missing_xcb_packages() -> list[str]:
    """The apt packages of XCB_LIBRARIES that this process cannot load (the same dlopen Qt does), in order."""
    import ctypes

    missing = []
    for soname, package in XCB_LIBRARIES.items():
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(package)
    return missing


def xcb_problem(environ: dict[str, str]) -> str | None:
    """A one-line message if Qt would start on xcb (Linux, no other platform asked for) without its libraries."""
    platform = environ.get("QT_QPA_PLATFORM", "")
    uses_xcb = "xcb" in platform or (not platform and not environ.get("WAYLAND_DISPLAY"))
    if not sys.platform.startswith("linux") or not uses_xcb:
        return None
    missing = missing_xcb_packages()
    if not missing:
        return None
    return (f"ondevice chat: Qt's xcb platform needs {', '.join(missing)}: sudo apt-get install {' '.join(missing)}"
            " (or run with QT_QPA_PLATFORM=wayland or offscreen)")


class ChatBackend(QObject):
    """Owns the model; lives on a worker thread. Slots run there, signals carry results to the window."""

    loaded = Signal(str)  # a description of the loaded model
    piece = Signal(str)  # streamed text
    finished = Signal(dict)  # stats of the reply
    failed = Signal(str)  # a one-line error

    def __init__(self) -> None:
        super().__init__()
        self.model: Any = None
        self.stop_requested = threading.Event()

    @Slot(str)
    def load(self, path: str) -> None:
        import ondevice

        try:
            if self.model is not None:
                self.model.close()
            self.model = ondevice.load(path or None, n_ctx=2048)
            self.loaded.emit(f"{Path(self.model.path).name} · {self.model.spec.arch} · {self.model.threads} threads")
        except Exception as exc:  # shown in the window; the app keeps running
            self.model = None
            self.failed.emit(f"cannot load {path or 'the default model'}: {exc}")

    @Slot(list, dict)
    def generate(self, messages: list, options: dict) -> None:
        from ondevice.structured import TokenFilter

        if self.model is None:
            self.failed.emit("no model loaded: use Open model…")
            return
        self.stop_requested.clear()
        try:
            schema = options.pop("json_schema", None)
            token_filter = TokenFilter(self.model, json_schema=json.loads(schema)) if schema else None
            stream = self.model.generate(messages, token_filter=token_filter, **options)
            for text in stream:
                if self.stop_requested.is_set():
                    stream.close()
                    break
                self.piece.emit(text)
            # stream.close() finalizes the stats of a stopped reply (tokens so far, rates, finish_reason "stopped").
            stats = self.model.last_stats
            self.finished.emit({"tokens": stats.generated_tokens, "tok_s": stats.decode_tok_s,
                                "finish": stats.finish_reason})
        except Exception as exc:
            self.failed.emit(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class ChatWindow(QMainWindow):
    request_load = Signal(str)
    request_generate = Signal(list, dict)

    def __init__(self, model_path: str | None, schema_path: str | None, *, autoprompt: str | None = None,
                 screenshot: str | None = None) -> None:
        super().__init__()
        self.autoprompt = autoprompt  # sent once the model is loaded
        self.screenshot_path = screenshot  # saved (then the window closes) after the first reply
        self.outcome: dict[str, Any] = {}
        self.setWindowTitle("ondevice chat")
        self.resize(820, 560)
        self.messages: list[dict[str, str]] = []
        self.reply = ""
        self.schema: dict | None = None
        self.busy = False

        self.model_label = QLabel("loading…")
        open_button = QPushButton("Open model…")
        open_button.clicked.connect(self.pick_model)
        self.schema_button = QPushButton("JSON schema…")
        self.schema_button.clicked.connect(self.pick_schema)
        from ondevice.runtime.sampling import DEFAULTS

        # ondevice's one set of sampling defaults, the same as `run` and the server use.
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=DEFAULTS.temperature)
        self.max_tokens = QSpinBox(minimum=1, maximum=2048, value=DEFAULTS.max_tokens)
        top = QHBoxLayout()
        for widget in (open_button, self.model_label):
            top.addWidget(widget)
        top.addStretch(1)
        for widget in (self.schema_button, QLabel("temperature"), self.temperature, QLabel("max tokens"),
                       self.max_tokens):
            top.addWidget(widget)

        self.transcript = QPlainTextEdit(readOnly=True)
        self.transcript.setStyleSheet("font-size: 14px;")
        self.input = QLineEdit(placeholderText="Message (Enter to send)")
        self.input.returnPressed.connect(self.send_or_stop)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send_or_stop)
        bottom = QHBoxLayout()
        bottom.addWidget(self.input, 1)
        bottom.addWidget(self.send_button)

        layout = QVBoxLayout()
        layout.addLayout(top)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(bottom)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)

        # The runtime on its own thread: signals to it are queued, so load/generate never block the window.
        self.thread_ = QThread()
        self.backend = ChatBackend()
        self.backend.moveToThread(self.thread_)
        self.request_load.connect(self.backend.load)
        self.request_generate.connect(self.backend.generate)
        self.backend.loaded.connect(self.on_loaded)
        self.backend.piece.connect(self.on_piece)
        self.backend.finished.connect(self.on_finished)
        self.backend.failed.connect(self.on_failed)
        self.thread_.start()
        if schema_path:
            self.load_schema(schema_path)
        self.set_busy(True)
        self.request_load.emit(model_path or "")

    # ------------------------------------------------------------------ actions
    def pick_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", "", "GGUF models (*.gguf)")
        if path:
            self.model_label.setText("loading…")
            self.set_busy(True)
            self.request_load.emit(path)

    def pick_schema(self) -> None:
        if self.schema is not None:  # the button toggles: a second click clears the schema
            self.schema = None
            self.schema_button.setText("JSON schema…")
            return
        path, _ = QFileDialog.getOpenFileName(self, "Pick a JSON Schema", "", "JSON Schema (*.json)")
        if path:
            self.load_schema(path)

    def load_schema(self, path: str) -> None:
        from ondevice.errors import OndeviceError
        from ondevice.structured import compile_grammar, load_schema

        try:
            schema = load_schema(path)
            compile_grammar(json_schema=schema)  # refuse a bad schema here, not mid-reply
        except OndeviceError as exc:
            self.append(f"[schema not used: {exc}]\n")
            return
        self.schema = schema
        self.schema_button.setText(f"schema: {Path(path).name} ✕")

    def send_or_stop(self) -> None:
        if self.busy:
            self.backend.stop_requested.set()
            return
        text = self.input.text().strip()
        if not text:
            return
        self.input.clear()
        self.messages.append({"role": "user", "content": text})
        self.append(f"You: {text}\nModel: ")
        self.reply = ""
        # The rest (top_k, top_p, min_p, repeat_penalty) are generate()'s defaults: SamplingDefaults.
        options: dict[str, Any] = {"temperature": self.temperature.value(), "max_tokens": self.max_tokens.value()}
        if self.schema is not None:
            options["json_schema"] = json.dumps(self.schema)  # as text: Qt maps would sort its keys
        self.set_busy(True, generating=True)
        self.request_generate.emit(list(self.messages), options)

    # ------------------------------------------------------------------ backend events
    def on_loaded(self, description: str) -> None:
        self.model_label.setText(description)
        self.set_busy(False)
        if self.autoprompt:
            self.input.setText(self.autoprompt)
            self.autoprompt = None
            self.send_or_stop()

    def on_piece(self, text: str) -> None:
        self.reply += text
        self.append(text)

    def on_finished(self, stats: dict) -> None:
        self.messages.append({"role": "assistant", "content": self.reply})
        self.append(f"\n[{stats['tokens']} tokens, {stats['tok_s']:.0f} tok/s, {stats['finish']}]\n\n")
        self.set_busy(False)
        if self.screenshot_path:
            self.outcome.update(stats, reply=self.reply)
            QTimer.singleShot(100, self.save_and_close)

    def save_and_close(self) -> None:
        self.grab().save(self.screenshot_path)
        self.close()

    def on_failed(self, message: str) -> None:
        if self.messages and self.messages[-1]["role"] == "user" and self.busy:
            self.messages.pop()
        self.append(f"\n[error: {message}]\n\n")
        self.model_label.setText(self.model_label.text().replace("loading…", "no model"))
        self.set_busy(False)
        if self.screenshot_path:
            self.outcome["error"] = message
            self.close()

    # ------------------------------------------------------------------ helpers
    def append(self, text: str) -> None:
        cursor = self.transcript.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(text)
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    def set_busy(self, busy: bool, generating: bool = False) -> None:
        self.busy = busy
        self.send_button.setText("Stop" if generating else "Send")
        self.send_button.setEnabled(generating or not busy)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt naming
        self.backend.stop_requested.set()
        self.thread_.quit()
        self.thread_.wait(10_000)
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ondevice desktop chat (PySide6)")
    ap.add_argument("model", nargs="?", help="GGUF file or alias (default: smollm2-135m-instruct)")
    ap.add_argument("--schema", help="JSON Schema file: replies are JSON valid against it")
    ap.add_argument("--prompt", help="send this message once the model is loaded")
    ap.add_argument("--screenshot", help="with --prompt: save the window here after the reply, then quit")
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for --screenshot (default 120)")
    args = ap.parse_args(argv)

    problem = xcb_problem(dict(os.environ))  # before Qt aborts with a page of plugin-loader text
    if problem:
        print(problem, file=sys.stderr)
        return 1
    app = QApplication(sys.argv[:1])
    window = ChatWindow(args.model, args.schema, autoprompt=args.prompt,
                        screenshot=args.screenshot if args.prompt else None)
    window.show()
    started = time.monotonic()
    if args.screenshot:
        def give_up() -> None:
            window.outcome["error"] = "timeout"
            window.close()

        QTimer.singleShot(int(args.timeout * 1000), give_up)
    code = app.exec()
    if args.screenshot:
        print(json.dumps({**window.outcome, "seconds": round(time.monotonic() - started, 1)}))
        return 0 if "error" not in window.outcome else 1
    return code

if __name__ == "__main__":
    sys.exit(main())
