"""`ondevice serve` against hostile and malformed requests: every one gets a 4xx JSON answer, the server stays up
and answers /health while it generates. A tiny random model keeps this fast; the real one is in test_server.py."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import ondevice
from ondevice.cli import main as cli
from ondevice.server import Limits, create_server

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    assert cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "f32", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    return out


@pytest.fixture(scope="module")
def server(tiny_gguf):
    model = ondevice.load(tiny_gguf, n_ctx=256)
    srv = create_server(model, "127.0.0.1", 0, limits=Limits(max_tokens=64, max_body_bytes=64 * 1024))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.close()
    thread.join(5)
    model.close()


def raw(server, request: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send bytes as they are; the status and JSON body of the answer (fails on a dropped connection)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
                b"content-length:")]
            if length and len(body) >= length[0]:
                break
    assert data, "the server dropped the connection without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body.strip() else {}


def post(server, body: bytes, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"):
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Connection: close"]
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return raw(server, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def chat_body(**extra) -> bytes:
    return json.dumps({"messages": MESSAGES, "max_tokens": 4, **extra}).encode()


@pytest.mark.parametrize("name, body", [
    ("huge seed", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"),
    ("100000 brackets", b"[" * 100000),
    ("messages nested 2000 deep", b'{"messages": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("not JSON", b"{nope"),
    ("invalid UTF-8", b'{"messages": "\xff\xfe"}'),
    ("an array body", b"[1, 2, 3]"),
    ("messages a string", b'{"messages": "hi"}'),
    ("content a number", b'{"messages": [{"role": "user", "content": 5}]}'),
    ("unknown role", b'{"messages": [{"role": "wizard", "content": "hi"}]}'),
])
def test_malformed_bodies_get_a_4xx_json_error(server, name: str, body: bytes) -> None:
    status, answer = post(server, body)
    assert 400 <= status < 500, (name, status, answer)
    assert answer["error"]["message"], name


@pytest.mark.parametrize("length", ["-5", "-1", "+5", " 5", "0x10", "1e3", "99999999999999999999", "abc"])
def test_bad_content_length_is_refused_before_reading(server, length: str) -> None:
    status, answer = post(server, chat_body(), {"Content-Length": length})
    assert status in (400, 411, 413), (length, status)


def test_a_large_body_behind_a_negative_length_is_not_read(server) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n")
        sent = 0
        try:  # a 50 MB body: the server answers and closes instead of reading it
            while sent < 50 << 20:
                sock.sendall(b"x" * (1 << 20))
                sent += 1 << 20
        except OSError:
            pass
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and sent < 50 << 20


def test_a_long_path_gets_404(server) -> None:
    status, answer = raw(server, f"GET /{'a' * 5000} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                         .encode())
    assert status in (404, 414) and ("error" in answer or status == 414)


def test_host_header_of_another_name_is_refused_on_loopback(server) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: attacker.example:8080\r\nConnection: close\r\n\r\n"
    status, answer = raw(server, request)
    assert status == 403 and "allow-host" in answer["error"]["message"]
    port = server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert raw(server, f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())[0] == 200


def test_head_requests_answer_without_a_body(server) -> None:
    host, port = server.server_address[:2]
    for path in ("/health", "/"):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("HEAD", path)
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"" and int(response.getheader("Content-Length")) > 0
        conn.close()


def test_health_answers_during_generation_and_after_hostile_requests(server) -> None:
    host, port = server.server_address[:2]
    done = threading.Event()

    def long_request() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MESSAGES, "max_tokens": 64}),
                     headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        done.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    for _ in range(20):
        post(server, b"[" * 100000)
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    worker.join(60)
    assert done.is_set()


def test_port_in_use_is_a_one_line_error(tiny_gguf) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ondevice", "serve", str(tiny_gguf), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"ondevice: error: port {port} is in use; pick another with --port"
    assert "Traceback" not in result.stderr
