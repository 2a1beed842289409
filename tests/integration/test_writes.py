"""How an answer reaches the socket: a response's head and body in one write, and
nothing held back or reordered (framework/serve/server.py)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from pathlib import Path
from typing import AsyncIterator, Iterator

import orjson
import pytest
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

import framework
from conftest import Server, free_port
from framework.serve.server import HTTPProtocol, OneWrite


def tripled(x: int) -> int:
    return 3 * x


def _writes(pid: int) -> int:
    """The write system calls `pid` has made (write, writev: how uvloop sends)."""
    text = Path(f"/proc/{pid}/io").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("syscw")))


def test_a_response_head_and_body_go_out_in_one_write(tmp_path: Path) -> None:
    """uvicorn writes the head and the body apart: two writes per answer, which an
    `inline=True` call (no thread to wake) shows alone. One now, for small and large answers."""
    store = tmp_path / "store"
    framework.deploy(tripled, store=str(store), inline=True)
    # The access log writes its lines in batches, once every 50 ms at most.
    server = Server(store, cwd=tmp_path)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for rows, requests in ((1, 200), (5000, 20)):
            body = orjson.dumps({"data": [[i, i] for i in range(rows)]})
            expected = orjson.dumps({"data": [[i, 3 * i] for i in range(rows)]})
            conn.request("POST", "/v1/tripled/latest", body)  # loads the version first
            assert conn.getresponse().read() == expected
            before = _writes(server.proc.pid)
            for _ in range(requests):
                conn.request("POST", "/v1/tripled/latest", body)
                answer = conn.getresponse()
                assert answer.status == 200 and answer.read() == expected
            per_request = (_writes(server.proc.pid) - before) / requests
            assert per_request < 1.5, f"{per_request} writes per {rows}-row answer"
        conn.close()
    finally:
        server.stop()


@pytest.fixture
def streaming() -> Iterator[int]:
    """uvicorn with the runtime's protocol, in a thread, serving a stream whose body waits
    until `POST /release`."""
    release = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        await release.wait()
        yield b"the body"

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    async def let_go(request: Request) -> PlainTextResponse:
        release.set()
        return PlainTextResponse("released")

    app = Starlette(routes=[Route("/stream", stream), Route("/release", let_go, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HTTPProtocol,
                                           loop="uvloop", log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):  # bounded: up to about 10 s for the server to listen
        if server.started:
            break
        threading.Event().wait(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_head_whose_body_is_not_ready_is_sent_without_it(streaming) -> None:
    """A held head goes out at the loop's next turn: here the body only comes once the
    client has the head (a held head would leave both waiting until the socket timeout)."""
    port = streaming
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    client.request("GET", "/stream")
    answer = client.getresponse()  # returns with the head, before any of the body
    assert answer.status == 200 and answer.getheader("content-type").startswith("text/plain")
    other = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    other.request("POST", "/release")
    assert other.getresponse().read() == b"released"
    assert answer.read() == b"the body"
    client.close()
    other.close()


def test_held_writes_keep_their_order_and_a_close_sends_them_first() -> None:
    """On a real uvloop transport over a socket pair: whatever the writes, the peer reads
    every byte in order, and closing sends what was held before the end of the stream."""

    async def run() -> list[bytes]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        writer = OneWrite(transport, loop)
        got: list[bytes] = []

        async def read_until(end: bytes) -> None:
            data = b""
            for _ in range(1000):  # bounded
                if data.endswith(end):
                    break
                data += await asyncio.wait_for(loop.sock_recv(theirs, 65536), 20)
            got.append(data)

        writer.write(b"head 1|")
        writer.write(b"body 1|")
        writer.write(b"head 2|")  # held, then sent at the next turn with nothing after it
        await read_until(b"head 2|")
        writer.write(b"a")
        writer.writelines([b"b", b"c|"])  # sends the held "a" first
        await read_until(b"c|")
        writer.write(b"last|")
        writer.close()  # sends "last|", then ends the stream
        data = b""
        for _ in range(1000):  # bounded: until the end of the stream
            piece = await asyncio.wait_for(loop.sock_recv(theirs, 65536), 20)
            if not piece:
                break
            data += piece
        got.append(data)
        theirs.close()
        return got

    assert uvloop.run(run()) == [b"head 1|body 1|head 2|", b"abc|", b"last|"]
