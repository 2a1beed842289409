"""Bounded load over loopback: wrk where installed, else a Python generator.

Both keep `connections` keep-alive connections busy for `seconds`, POSTing
one body, and report requests/s, p50/p99 latency and the non-2xx count.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass


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


async def _python(url: str, body: bytes, connections: int, seconds: float) -> Load:
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    request = (
        f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
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
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                errors += not head.startswith(b"HTTP/1.1 2")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(connections))), seconds + 30)
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return Load(len(latencies) / elapsed, cuts[49] * 1e3, cuts[98] * 1e3, errors)
