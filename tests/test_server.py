"""`ondevice serve`: the official openai client as a real client, bad requests, limits, disconnects, load.

Every test starts its own server on 127.0.0.1 (port 0) around one loaded SmolLM2 and stops it afterwards.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from ondevice.server import Limits, OndeviceServer, create_server  # noqa: E402

pytestmark = pytest.mark.slow
ISSUE_SCHEMA = json.loads((Path(__file__).parent.parent / "examples" / "github_issue.schema.json").read_text())
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def model(smollm2: Path):
    import ondevice

    m = ondevice.load(smollm2, n_ctx=1024)
    yield m
    m.close()


@contextmanager
def running(model, **options) -> Iterator[OndeviceServer]:
    server = create_server(model, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(model) -> Iterator[OndeviceServer]:
    with running(model, limits=Limits(max_tokens=512, max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.fixture()
def client(server: OndeviceServer):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(server: OndeviceServer, path: str, body: bytes | dict, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, payload


def wait_idle(server: OndeviceServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.engine.running is not None or server.engine.waiting():
        assert time.monotonic() < deadline, "engine did not become idle"
        time.sleep(0.05)


def test_models_and_health(server: OndeviceServer, client) -> None:
    assert [m.id for m in client.models.list()] == [server.model_id]
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


def test_chat_stream_matches_non_stream(server: OndeviceServer, client) -> None:
    params = dict(model=server.model_id, messages=HI, max_tokens=24, temperature=0)
    # Warm-up: later requests then reuse the cached prompt identically (a full prefill and a one-token step
    # differ in rounding, which can flip greedy choices at near-ties).
    client.chat.completions.create(**params)
    whole = client.chat.completions.create(**params)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # really streamed, token by token
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: identical text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stop_and_sampling(server: OndeviceServer, client) -> None:
    client.completions.create(model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=1)  # warm-up, as above
    r = client.completions.create(model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                  stop=[" 7"])
    assert r.object == "text_completion" and r.choices[0].finish_reason == "stop"
    assert " 7" not in r.choices[0].text and r.choices[0].text.startswith(" 5")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"], stream=True))
    assert streamed == r.choices[0].text
    # Seeded sampling is reproducible.
    _, a, b = (client.chat.completions.create(model=server.model_id, messages=HI, max_tokens=12,
                                              temperature=1.0, seed=42).choices[0].message.content
               for _ in range(3))
    assert a == b
    r = client.chat.completions.create(model=server.model_id, messages=HI, max_tokens=3, temperature=0.7)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_response_format_json_schema(server: OndeviceServer, client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "issue", "schema": ISSUE_SCHEMA, "strict": True}}
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model=server.model_id, temperature=temperature, max_tokens=120, response_format=fmt,
            messages=[{"role": "user", "content": "The export button crashes the app on Android."}])
        jsonschema.validate(json.loads(r.choices[0].message.content), ISSUE_SCHEMA)
    r = client.chat.completions.create(model=server.model_id, messages=HI, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", {"messages": []}, 400, "non-empty"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": HI, "stop": [1]}, 400, "stop"),
        ("/v1/chat/completions", {"messages": HI, "n": 3}, 400, "'n'"),
        ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "xml"}}, 400, "response_format"),
        ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"not": {"type": "string"}}}}}, 400, "Unimplemented"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1200}]}, 400,
         "context window"),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": HI}, 404, "does not exist"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/nothing", {"prompt": "x"}, 404, "no route"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 70000}]}, 413, "exceeds"),
    ],
)
def test_bad_requests_get_openai_error_bodies(server: OndeviceServer, path: str, body, status: int,
                                              fragment: str) -> None:
    code, payload = post(server, path, body)
    assert code == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert fragment in payload["error"]["message"]
    code, payload = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert code == 200 and payload["choices"][0]["message"]["content"]  # still serving


def test_openai_client_raises_on_bad_request(server: OndeviceServer, client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model_id, messages=HI, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI)


def test_api_key(model) -> None:
    with running(model, api_key="s3cret") as srv:
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=srv.model_id, messages=HI, max_tokens=2)
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=srv.model_id, messages=HI, max_tokens=2).choices


def _raw_request(server: OndeviceServer, body: dict) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_disconnect_stops_generation(server: OndeviceServer) -> None:
    wait_idle(server)
    long_reply = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                  "max_tokens": 400, "temperature": 0.8, "min_p": 0.0, "seed": 1}
    # Streaming: read the first content chunk, then hang up.
    sock = _raw_request(server, {**long_reply, "stream": True})
    received = b""
    while received.count(b"data: ") < 3:
        chunk = sock.recv(4096)
        assert chunk, received  # the server answered and closed instead of streaming
        received += chunk
    sock.close()
    job_id = re.search(rb"chatcmpl-([0-9a-f]+)", received).group(1).decode()
    wait_idle(server)
    record = server.engine.record(job_id)
    assert record.status == "cancelled" and record.completion_tokens < 100, record
    # Not streaming: hang up while it generates.
    served = server.engine.served
    sock = _raw_request(server, long_reply)
    deadline = time.monotonic() + 30
    while server.engine.running is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    sock.close()
    wait_idle(server)
    assert server.engine.served == served + 1
    record = server.engine.records[-1]
    assert record.status == "cancelled" and record.completion_tokens < 100, record


def test_32_concurrent_clients(model) -> None:
    with running(model, max_queue=6) as srv:
        results: list[tuple[int, dict]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            try:
                outcome = post(srv, "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": f"Give me a word that rhymes with {i}."}],
                    "max_tokens": 6, "temperature": 0.8, "seed": i}, timeout=120)
            except Exception as exc:  # a reset or refused connection would be a failure
                outcome = (-1, {"exception": repr(exc)})
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        elapsed = time.monotonic() - start
        statuses = sorted(status for status, _ in results)
        assert len(results) == 32 and set(statuses) <= {200, 429, 503}, statuses
        ok = [body for status, body in results if status == 200]
        refused = [body for status, body in results if status != 200]
        assert len(ok) >= 7 and all(b["choices"][0]["message"]["content"] for b in ok)  # running + queue
        assert refused and all(b["error"]["code"] in ("rate_limit_exceeded", "overloaded") for b in refused)
        # The server is still up and answers normally.
        status, body = post(srv, "/v1/chat/completions", {"messages": HI, "max_tokens": 3})
        assert status == 200, body
        print(f"32 clients: {len(ok)} answered, {len(refused)} refused (429/503) in {elapsed:.1f} s")


def test_connection_cap(model) -> None:
    with running(model, max_connections=2) as srv:
        held = [socket.create_connection(srv.server_address[:2], timeout=10) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(srv.server_address[:2], timeout=10)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"overloaded" in reply
        for s in [*held, extra]:
            s.close()
        time.sleep(0.2)
        status, _ = post(srv, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
        assert status == 200


def test_cli_serve_starts_and_stops(smollm2: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ondevice", "serve", str(smollm2), "--port", "0",
                             "--ctx", "512"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert url, line
        host, port = url.group(1)[7:].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == smollm2.stem
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
