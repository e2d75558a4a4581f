"""The HTTP layer: stdlib ThreadingHTTPServer, one thread per connection, generation on the engine's worker.

No web framework: the API is four routes, SSE is plain chunked writes, and the standard library keeps the
runtime dependency-free. Handler threads only parse, validate, wait and write; the model runs on one worker.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import queue
import select
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ondevice.errors import OndeviceError
from ondevice.runtime.sampling import logit_bias_pairs
from ondevice.server.engine import Engine, EngineStopped, Job, QueueFull
from ondevice.server.protocol import (
    Limits,
    ParsedRequest,
    RequestError,
    chunk_body,
    completion_body,
    default_sampling,
    error_body,
    parse_request,
    usage_chunk,
)


def _default_web_dir() -> Path:
    """apps/web as installed in the wheel (ondevice/web), else the checkout's apps/web (editable installs)."""
    installed = Path(__file__).resolve().parents[1] / "web"
    return installed if (installed / "index.html").is_file() else Path(__file__).resolve().parents[2] / "apps" / "web"


DEFAULT_WEB_DIR = _default_web_dir()
ONNX_ROUTE = "/model/"  # where --onnx DIR is served, for the in-browser page
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
                  ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json",
                  ".jinja": "text/plain; charset=utf-8", ".png": "image/png"}
_BUSY_BODY = json.dumps(error_body("too many open connections; retry shortly", kind="server_error",
                                  code="overloaded")).encode()
_RAW_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


MAX_JSON_DEPTH = 64  # chat requests nest 4-6 levels; deeper is an attack on the parser or the template
MAX_PATH_CHARS = 1024


def check_json_value(value: Any) -> None:
    """A parsed body's nesting stays shallow and every string is valid Unicode (a lone surrogate such as
    "\\ud800" parses as JSON but cannot be encoded or tokenized)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("the request body has a string that is not valid Unicode "
                                   "(a lone surrogate such as \\ud800)") from None
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _allowed_hosts(bind: str, port: int, extra: tuple[str, ...]) -> frozenset[str] | None:
    """Host header values accepted on a loopback bind; None (any) when bound to a network address."""
    loopback = bind in ("localhost", "::1") or bind.startswith("127.")
    if not loopback:
        return None
    names = {"localhost", "127.0.0.1", "[::1]", bind, *(h.lower() for h in extra)}
    return frozenset(names | {f"{name}:{port}" for name in names})


class _HeadersOnly:
    """The handler's output for a HEAD request: the status line and headers go out, the body does not."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.headers_sent = False

    def write(self, data: bytes) -> int:
        if not self.headers_sent:
            self.headers_sent = True
            self.real.write(data)
        return len(data)

    def flush(self) -> None:
        self.real.flush()


class ClientGone(Exception):
    """The client closed the connection."""


class OndeviceServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: bursts of clients connect before threads pick them up

    def __init__(self, address: tuple[str, int], model: Any, *, model_id: str, api_key: str | None = None,
                 limits: Limits | None = None, max_queue: int = 16, max_connections: int = 64,
                 queue_timeout_s: float = 300.0, web_dir: Path | None = DEFAULT_WEB_DIR,
                 onnx_dir: Path | None = None, verbose: bool = False,
                 allow_hosts: tuple[str, ...] = (), parallel: int = 1) -> None:
        self.model = model
        self.model_id = model_id
        self.api_key = api_key
        self.limits = limits or Limits()
        self.queue_timeout_s = queue_timeout_s
        self.web_dir = Path(web_dir).resolve() if web_dir else None
        self.onnx_dir = Path(onnx_dir).resolve() if onnx_dir else None
        self.onnx_graph = _browser_graph(self.onnx_dir) if self.onnx_dir else None  # (file name, bytes) or None
        self.verbose = verbose
        self.started_at = int(time.time())
        self._slots = threading.BoundedSemaphore(max_connections)
        self.warm_thread: threading.Thread | None = None  # set before binding: a failed bind still closes cleanly
        self.engine: Engine | None = None
        super().__init__(address, Handler)
        # Host names a browser may use to reach this server: on a loopback bind only the loopback names, so a page
        # on another origin that rebinds its DNS name to 127.0.0.1 is refused (None: any Host, network binds).
        self.allowed_hosts = _allowed_hosts(address[0], self.server_address[1], allow_hosts)
        # model None: no server-side model (`ondevice serve --onnx DIR`): static files only, the page runs the
        # ONNX folder in the browser and the /v1 routes answer 404.
        self.engine = Engine(model, max_queue=max_queue, parallel=parallel) if model is not None else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # bounded threads: refuse, don't pile up
            try:
                request.sendall(_RAW_503)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line per failure instead of socketserver's traceback (clients that vanish are routine)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, ClientGone, TimeoutError)):
            if self.verbose:
                print(f"ondevice serve: client {client_address[0]} disconnected", file=sys.stderr)
            return
        print(f"ondevice serve: error handling a request from {client_address[0]}: {type(exc).__name__}: {exc}",
              file=sys.stderr)

    def server_close(self) -> None:
        # A daemon thread still inside llguidance's native code when the interpreter finalizes is torn down by a
        # forced unwind through Rust frames: a segfault at exit (seen on Ctrl-C right after start). Wait for it.
        if self.warm_thread is not None:
            self.warm_thread.join(timeout=120)
        super().server_close()

    def close(self) -> None:
        """Stop accepting, cancel generation, release the socket (call from another thread than serve_forever)."""
        self.shutdown()
        if self.engine is not None:
            self.engine.stop()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: OndeviceServer
    timeout = 60  # idle keep-alive connections give their slot back
    server_version = "ondevice"
    _last_probe = 0.0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ plumbing
    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: RequestError, headers: dict[str, str] | None = None) -> None:
        self._send_json(exc.status, exc.body(), headers)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if hmac.compare_digest(token.encode(), key.encode()):
            return True
        self._send_error(RequestError("invalid or missing API key (send Authorization: Bearer KEY)",
                                      status=401, code="invalid_api_key"))
        return False

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise RequestError("send the body with a Content-Length header", status=411)
        if not (length.isascii() and length.isdigit()) or len(length) > 15:  # no sign, no spaces, no 10**30
            self.close_connection = True
            raise RequestError(f"bad Content-Length header {length[:40]!r}: a byte count is digits only")
        size = int(length)
        if size > self.server.limits.max_body_bytes:
            self.close_connection = True  # the unread body would corrupt the next request on this connection
            raise RequestError(f"request body of {size} bytes exceeds the limit of "
                               f"{self.server.limits.max_body_bytes}", status=413, code="request_too_large")
        raw = self.rfile.read(size)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise RequestError(f"the request body has an unreadable value: {str(exc)[:120]}") from None
        check_json_value(body)
        return body

    def _client_gone(self) -> bool:
        """True if the peer closed its end (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ClientGone from exc

    def _sse(self, payload: dict[str, Any] | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._write_chunk(f"data: {text}\n\n".encode())

    # ------------------------------------------------------------------ routes
    def _host_allowed(self) -> bool:
        allowed = self.server.allowed_hosts
        host = (self.headers.get("Host") or "").strip().lower()
        if allowed is None or host in allowed:
            return True
        self.close_connection = True
        self._send_error(RequestError(f"Host {host[:80]!r} is not served here (this loopback server answers "
                                      "localhost and 127.0.0.1; add names with --allow-host)", status=403,
                                      code="host_not_allowed"))
        return False

    def _guarded(self, route: Any) -> None:
        """Every request gets an answer: an unexpected failure is one log line and a 500, never a dropped socket."""
        try:
            if self._host_allowed():
                route()
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a long-running server
            self.close_connection = True
            print(f"ondevice serve: {self.command} {self.path[:80]}: {type(exc).__name__}: {str(exc)[:200]}",
                  file=sys.stderr)
            try:
                self._send_error(RequestError("internal error while handling the request", status=500,
                                              code="internal_error", kind="server_error"))
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._guarded(self._get)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        real = self.wfile
        self.wfile = _HeadersOnly(real)
        try:
            self._guarded(self._get)
        finally:
            self.wfile = real

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._guarded(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
        if path == "/health":
            if engine is None:
                self._send_json(200, {"status": "ok", "model": None, "onnx_model": self._onnx_name()})
                return
            self._send_json(200, {"status": "ok", "model": self.server.model_id, "waiting": engine.waiting(),
                                  "busy": engine.running is not None, "running": len(engine.running_jobs),
                                  "parallel": engine.parallel, "served": engine.served})
        elif path == "/web-config.json":  # what the pages need to know: which modes this server offers
            self._send_json(200, {"api_model": self.server.model_id if engine else None,
                                  "onnx_model": self._onnx_name(),
                                  "onnx_base": ONNX_ROUTE.lstrip("/") if self.server.onnx_dir else None,
                                  "sampling": default_sampling(self.server.limits)})
        elif path.startswith("/v1/") and engine is None:
            self._send_error(self._no_model_error(path))
        elif path.startswith(ONNX_ROUTE) and self.server.onnx_dir:
            rel = path[len(ONNX_ROUTE):]
            graph = self.server.onnx_graph
            if graph is not None and rel == graph[0]:  # the decoder graph, rewritten for onnxruntime-web
                self._send_body(graph[1], "application/octet-stream")
            else:
                self._send_file(self.server.onnx_dir, rel)
        elif path in ("/v1/models", f"/v1/models/{self.server.model_id}"):
            if not self._authorized():
                return
            card = {"id": self.server.model_id, "object": "model", "created": self.server.started_at,
                    "owned_by": "ondevice"}
            self._send_json(200, card if path != "/v1/models" else {"object": "list", "data": [card]})
        elif path.startswith("/v1/models/"):
            if self._authorized():
                self._send_error(RequestError(f"model '{path[11:]}' does not exist; this server serves "
                                              f"'{self.server.model_id}'", status=404, code="model_not_found"))
        else:
            self._static(path)

    def _onnx_name(self) -> str | None:
        return self.server.onnx_dir.name if self.server.onnx_dir else None

    def _no_model_error(self, path: str) -> RequestError:
        return RequestError(f"this server has no server-side model (started with --onnx only: the page at / runs "
                            f"the model in the browser); no route for {path}", status=404, code="model_not_found")

    def _static(self, path: str) -> None:
        if path in ("/", ""):  # the server-backed page, or the in-browser one when there is no server-side model
            path = "/index.html" if self.server.engine is not None else "/inbrowser.html"
        self._send_file(self.server.web_dir, path.lstrip("/"))

    def _send_file(self, root: Path | None, rel: str) -> None:
        """A file under root, streamed; 404 for anything outside it. COOP/COEP make the page cross-origin
        isolated, which onnxruntime-web needs for WebAssembly threads (everything it loads is same-origin)."""
        try:
            target = (root / rel).resolve() if root and rel and len(rel) <= MAX_PATH_CHARS else None
            found = target is not None and target.is_file() and root in target.parents
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            found = False
        if not found:
            self._send_error(RequestError(f"no route for GET /{rel}", status=404, code="not_found"))
            return
        self._static_headers(target.stat().st_size, _CONTENT_TYPES.get(target.suffix)
                             or mimetypes.guess_type(target.name)[0] or "application/octet-stream")
        try:
            with open(target, "rb") as fh:
                shutil.copyfileobj(fh, self.wfile, 1 << 20)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_body(self, data: bytes, content_type: str) -> None:
        self._static_headers(len(data), content_type)
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _static_headers(self, size: int, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(path)
        try:
            if kind is not None and self.server.engine is None:
                self.close_connection = True
                raise self._no_model_error(path)
            if kind is None:
                self.close_connection = True
                raise RequestError(f"no route for POST {path}", status=404, code="not_found")
            if not self._authorized():
                self.close_connection = True
                return
            body = self._read_json()
            self._model_check(body)
            req = parse_request(body, kind, self.server.limits)
            self._precheck(req)
            job = self.server.engine.submit(Job(req.prompt, req.generate_kwargs, req.json_schema))
        except RequestError as exc:
            self._send_error(exc)
            return
        except QueueFull as exc:
            self._send_error(RequestError(str(exc), status=429, code="rate_limit_exceeded",
                                          kind="rate_limit_error"), {"Retry-After": "1"})
            return
        except EngineStopped as exc:
            self._send_error(RequestError(str(exc), status=503, code="unavailable", kind="server_error"))
            return
        try:
            if req.stream:
                self._respond_stream(req, job)
            else:
                self._respond_whole(req, job)
        except ClientGone:
            job.cancelled.set()
            self.close_connection = True

    def _model_check(self, body: Any) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name not in (None, "", self.server.model_id):
            raise RequestError(f"model '{name}' does not exist; this server serves '{self.server.model_id}'",
                               status=404, param="model", code="model_not_found")

    def _precheck(self, req: ParsedRequest) -> None:
        """Errors we can find before queueing: prompt too long, bad schema, no chat template."""
        model = self.server.model
        try:  # the ids against this model's vocabulary, as prepare() will check them
            logit_bias_pairs(req.generate_kwargs.get("logit_bias"), model.spec.vocab_size)
        except OndeviceError as exc:
            raise RequestError(str(exc), param="logit_bias") from None
        try:
            if req.kind == "chat" and (req.tool_mode is not None or any(
                    m.get("tool_calls") or m["role"] == "tool" for m in req.prompt)):
                kw = req.generate_kwargs
                messages, template_vars, rules = model.tool_prompt(req.prompt, kw.get("tools"), kw.get("tool_choice"),
                                                                   kw.get("parallel_tool_calls", True))
                n_prompt = len(model.prompt_tokens(messages, **template_vars))
                if rules is not None:
                    from ondevice.structured import compile_grammar

                    try:
                        compile_grammar(grammar=rules)
                    except OndeviceError as exc:
                        raise RequestError(f"tools: {exc}", param="tools") from None
            else:
                n_prompt = len(model.prompt_tokens(req.prompt))
            if req.json_schema is not None:
                from ondevice.structured import compile_grammar

                try:
                    compile_grammar(json_schema=req.json_schema)
                except OndeviceError as exc:
                    raise RequestError(str(exc), param="response_format") from None
        except RequestError:
            raise
        except OndeviceError as exc:
            raise RequestError(str(exc)) from None
        if n_prompt >= model.n_ctx and not self.server.limits.context_shift:
            raise RequestError(f"the prompt is {n_prompt} tokens; the context window is {model.n_ctx}",
                               param="messages" if req.kind == "chat" else "prompt",
                               code="context_length_exceeded")

    def _next_event(self, job: Job) -> tuple:
        """Wait for the job's next event, watching for a vanished client and for queue timeouts."""
        deadline = job.submitted_at + self.server.queue_timeout_s
        while True:
            # Check the socket at most every 0.2 s, also while events keep arriving (non-stream replies
            # write nothing until the end, so only this check notices a client that left).
            now = time.monotonic()
            if now - self._last_probe > 0.2:
                self._last_probe = now
                if self._client_gone():
                    raise ClientGone
            try:
                return job.events.get(timeout=0.2)
            except queue.Empty:
                pass
            if not job.started.is_set() and time.monotonic() > deadline:
                job.cancelled.set()
                return ("error", 503, f"timed out after {self.server.queue_timeout_s:.0f} s waiting in the queue")

    def _error_event(self, status: int, message: str) -> RequestError:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return RequestError(message, status=status, kind=kind)

    def _respond_whole(self, req: ParsedRequest, job: Job) -> None:
        pieces: list[str] = []
        while True:
            event = self._next_event(job)
            if event[0] == "delta":
                pieces.append(event[1])
            elif event[0] == "error":
                self._send_error(self._error_event(event[1], event[2]))
                return
            else:
                _, finish, n_prompt, n_completion, closed, n_cached = event
                text: str | None = "".join(pieces)
                calls = None
                if req.tool_mode not in (None, "none"):
                    from ondevice.tools import ToolError, openai_tool_calls, parse_tool_calls

                    try:
                        text, parsed = parse_tool_calls(text)
                    except ToolError:
                        self._send_error(RequestError("the reply stopped before its tool call was complete (a "
                                                      "stop string?)"))
                        return
                    calls = openai_tool_calls(parsed) if parsed else None
                self._send_json(200, completion_body(req, job.id, self.server.model_id, text, finish,
                                                     n_prompt, n_completion, tool_calls=calls, closed_at_limit=closed,
                                                     cached_tokens=n_cached))
                return

    def _respond_stream(self, req: ParsedRequest, job: Job) -> None:
        event = self._next_event(job)
        if event[0] == "error":  # nothing sent yet: a proper HTTP error
            self._send_error(self._error_event(event[1], event[2]))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        model_id, created = self.server.model_id, int(time.time())
        if req.kind == "chat":
            self._sse(chunk_body(req, job.id, model_id, created, text="", first=True))
        calls = None
        if req.tool_mode not in (None, "none"):
            from ondevice.tools import ToolCallStream

            calls = ToolCallStream()
        while True:
            if event[0] == "delta":
                if calls is None:
                    self._sse(chunk_body(req, job.id, model_id, created, text=event[1]))
                else:
                    self._tool_chunks(req, job, calls.feed(event[1]), created)
            elif event[0] == "error":  # mid-stream: an error event the openai client raises as APIError
                self._sse(error_body(event[2], kind="server_error" if event[1] >= 500 else
                                     "invalid_request_error"))
                break
            else:
                _, finish, n_prompt, n_completion, closed, n_cached = event
                if calls is not None:
                    self._tool_chunks(req, job, calls.finish(), created)
                    if calls.index >= 0:
                        finish = "tool_calls"
                self._sse(chunk_body(req, job.id, model_id, created, finish_reason=finish, closed_at_limit=closed))
                if req.include_usage:
                    self._sse(usage_chunk(req, job.id, model_id, created, n_prompt, n_completion, n_cached))
                break
            event = self._next_event(job)
        self._sse("[DONE]")
        self._write_chunk(b"")  # end of the chunked body


    def _tool_chunks(self, req: ParsedRequest, job: Job, events: list[tuple], created: int) -> None:
        """ToolCallStream events as chunks: content deltas, or delta.tool_calls entries (OpenAI's streaming shape:
        the first entry of a call has its index, id, type and name, the next ones argument fragments)."""
        model_id = self.server.model_id
        for event in events:
            if event[0] == "content":
                self._sse(chunk_body(req, job.id, model_id, created, text=event[1]))
            elif event[0] == "call":
                _, index, call_id, name = event
                self._sse(chunk_body(req, job.id, model_id, created, tool_call={
                    "index": index, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}))
            else:
                _, index, fragment = event
                self._sse(chunk_body(req, job.id, model_id, created, tool_call={
                    "index": index, "function": {"arguments": fragment}}))


def create_server(model: Any, host: str = "127.0.0.1", port: int = 8080, *, model_id: str | None = None,
                  **options: Any) -> OndeviceServer:
    """A ready-to-run server around a loaded model (port 0 picks a free port); call serve_forever().

    model may be None with onnx_dir=FOLDER (an `ondevice convert --to onnx` folder): then the server only hands
    out the in-browser chat page and that folder under /model/, and the model runs in the browser."""
    if model is None and not options.get("onnx_dir"):
        raise OndeviceError("create_server needs a model, or onnx_dir for the in-browser page")
    name = model_id or (Path(model.path).stem if model is not None else Path(options["onnx_dir"]).name)
    server = OndeviceServer((host, port), model, model_id=name, **options)
    if model is not None:
        server.warm_thread = threading.Thread(target=_warm_structured_output, args=(model,), daemon=True)
        server.warm_thread.start()
    return server


def _browser_graph(folder: Path) -> tuple[str, bytes] | None:
    """The folder's decoder graph with MatMulNBits rewritten for onnxruntime-web (see browser_onnx), or None
    when there is nothing to rewrite or the onnx package is missing (the graph is then served as it is)."""
    from ondevice.server.browser_onnx import browser_graph

    try:
        name = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]["filename"]
        data, replaced = browser_graph(folder / name)
    except Exception:  # noqa: BLE001 - any graph we cannot rewrite (or no onnx package) is served as it is
        return None
    return (name, data) if replaced else None


def _warm_structured_output(model: Any) -> None:
    """Build the llguidance tokenizer (~2 s) now rather than on the first response_format request."""
    try:
        from ondevice.structured import ll_tokenizer

        ll_tokenizer(model)
    except Exception:  # llguidance missing: response_format requests will say so
        pass
