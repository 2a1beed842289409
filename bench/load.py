"""Bounded load over loopback: wrk where installed, else a Python generator.

Both keep `connections` keep-alive connections busy for `seconds`, POSTing
one body, and report requests/s, p50/p99 latency and the non-2xx count.
`paced` sends at a fixed rate instead, to read the latency of a server that
is not saturated; `Hammer` loads another endpoint meanwhile, from a process
of its own (`python bench/load.py URL BODY_FILE CONNECTIONS SECONDS`).
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def generator() -> str:
    return "wrk" if shutil.which("wrk") and not os.environ.get("BENCH_NO_WRK") else "python"


def run(url: str, body: bytes, *, connections: int, seconds: float, threads: int = 2) -> Load:
    """`threads`: wrk's threads (at most `connections`); the Python generator uses one."""
    if generator() == "wrk":
        return _wrk(url, body, connections, seconds, min(threads, connections))
    return asyncio.run(_python(url, body, connections, seconds))


# -- wrk ----------------------------------------------------------------------

LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{path}", "rb"); wrk.body = f:read("*a"); f:close()
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * UNITS[unit]


def _wrk(url: str, body: bytes, connections: int, seconds: float, threads: int) -> Load:
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "body.json"), "wb") as f:
            f.write(body)
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(LUA.format(path=os.path.join(tmp, "body.json")))
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             "--timeout", "10s", "--latency", "-s", script, url],
            capture_output=True, text=True, timeout=seconds + 30, check=True,
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Load(rps, p50, p99, errors)


# -- Python fallback ----------------------------------------------------------


def _request(url: str, body: bytes) -> tuple[str, int, bytes]:
    """Host, port and the bytes of one keep-alive POST of `body` to `url`."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    request = (
        f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return host, int(port), request


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    """One request and its answer on an open connection; whether it was a 2xx."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 2")


def summary(latencies: list[float], elapsed: float, errors: int) -> Load:
    """The rate, p50 and p99 (ms) of `latencies` (seconds) measured over `elapsed` seconds."""
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return Load(len(latencies) / elapsed, cuts[49] * 1e3, cuts[98] * 1e3, errors)


async def _python(url: str, body: bytes, connections: int, seconds: float) -> Load:
    host, port, request = _request(url, body)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            # Bounded twice: by the deadline, and by a count no run can reach.
            for _ in range(10_000_000):
                start = time.perf_counter()
                if start >= deadline:
                    break
                ok = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - start)
                errors += not ok
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(connections))), seconds + 30)
    return summary(latencies, time.perf_counter() - started, errors)


# -- paced: a fixed rate, for latency below saturation -------------------------


def paced(url: str, body: bytes, *, rate: float, seconds: float, connections: int = 8,
          keep: list[float] | None = None) -> Load:
    """`rate` requests/s for `seconds` over `connections` keep-alive connections.

    A closed loop (`run`) keeps the server saturated, so its latency mostly
    measures the queue; at a fixed rate well under capacity it measures what
    a request waits for besides its own work (another deployment's CPU, the GIL).
    Each request's latency counts from when it was sent; `keep` gets every one, in seconds.
    """
    return asyncio.run(_paced(url, body, rate, seconds, connections, keep))


async def _paced(url: str, body: bytes, rate: float, seconds: float, connections: int,
                 keep: list[float] | None) -> Load:
    host, port, request = _request(url, body)
    loop = asyncio.get_running_loop()
    count = max(2, int(rate * seconds))  # the bound on the requests sent
    numbers = itertools.count()
    latencies: list[float] = []
    errors = 0
    start_at = loop.time() + 0.05

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in numbers:
                if i >= count:
                    break
                delay = start_at + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.perf_counter()
                ok = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - sent)
                errors += not ok
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(connections))), seconds + 30)
    if keep is not None:
        keep.extend(latencies)
    return summary(latencies, time.perf_counter() - started, errors)


# -- another client, in a process of its own -----------------------------------


class Hammer:
    """Closed-loop load on one endpoint for `seconds`, from a child process, so that
    the harness can measure another endpoint meanwhile without sharing its GIL."""

    def __init__(self, url: str, body: bytes, *, connections: int, seconds: float, tmp: Path) -> None:
        self.seconds = seconds
        body_file = tmp / f"hammer-{os.getpid()}-{time.monotonic_ns()}.json"
        body_file.write_bytes(body)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, url, str(body_file), str(connections), str(seconds)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        # The child answers "ready" after its first 2xx; its own run is bounded, so is this read.
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"the second client did not start on {url}: {line!r}")

    def result(self) -> Load:
        """Waits (bounded) for the child's own end, and what it measured."""
        try:
            out, _ = self.proc.communicate(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError("the second client did not finish in time") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"the second client failed with code {self.proc.returncode}")
        return Load(**orjson.loads(out))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _hammer_main(url: str, body_file: str, connections: str, seconds: str) -> int:
    body = Path(body_file).read_bytes()
    host, port, _ = _request(url, body)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/" + url.removeprefix("http://").partition("/")[2], body,
                 {"Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    if answer.status // 100 != 2:
        print(f"answered {answer.status}", flush=True)
        return 1
    print("ready", flush=True)
    result = asyncio.run(_python(url, body, int(connections), float(seconds)))
    print(orjson.dumps(asdict(result)).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_hammer_main(*sys.argv[1:]))
