"""The access log: one JSON line per request, on stderr or through the
`framework.access` logger; `framework.serve.observe` hands in what requests did, in bulk."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable

import orjson
from starlette.types import Message, Receive, Send

if TYPE_CHECKING:
    from framework.serve.scope import Seen

PAYLOAD_LOG_LIMIT = 64 * 1024
LINE_CACHE = 4096  # kinds of request whose log line is kept encoded

access_log = logging.getLogger("framework.access")


class AccessLog:
    """JSON lines on stderr, or through the `framework.access` logger where the
    embedding application gave it handlers.

    Most requests differ from an earlier one only in their time and duration:
    the rest of their line is encoded once per kind of request (deployment,
    path, status, rows, error, key) and kept, up to `LINE_CACHE` kinds, which is
    cheaper than encoding a dictionary per line.
    """

    def __init__(self) -> None:
        self.logger = access_log if access_log.handlers else None
        self.lines: list[bytes] = []  # encoded, not written yet
        self._millisecond = -1
        self._stamp = b""
        self._parts: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}

    def timestamp(self, seconds: float) -> bytes:
        """`seconds` since the epoch as ISO 8601 UTC with milliseconds, formatted once
        per millisecond."""
        millisecond = int(seconds * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second, fraction = divmod(millisecond, 1000)
            self._stamp = b"%s.%03d+00:00" % (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode(), fraction)
        return self._stamp

    def _around(self, kind: tuple[Any, ...], payloads: Payloads | None) -> tuple[bytes, bytes]:
        """A line's JSON around its duration: from `"method"` to `"duration_ms":`, and
        from `,"error"` to the end."""
        labels, version, status, rows, errors, error, key, method, path = kind
        line: dict[str, Any] = {
            "method": method,
            "path": path[:200],
            "status": status,
            "deployment": labels[0] or None,
            "branch": labels[1] or None,
            "version": version,
            "rows": rows,
            "row_errors": errors,
            "duration_ms": 0,
            "error": error,
            "key_id": None if key is None else key.id,
        }
        if payloads is not None:
            line["request_body"] = payloads.request[:PAYLOAD_LOG_LIMIT].decode("utf-8", "replace")
            line["response_body"] = payloads.response[:PAYLOAD_LOG_LIMIT].decode("utf-8", "replace")
        head, _, tail = orjson.dumps(line).partition(b'"duration_ms":0')
        return head[1:] + b'"duration_ms":', tail + b"\n"

    def encode(self, seen: list[Seen]) -> None:
        """The lines of `seen`, kept for `write`."""
        # The wall clock now, less the monotonic one: each request's end as wall time.
        epoch = time.time() - time.perf_counter()
        parts = self._parts
        lines = self.lines
        for labels, version, status, start, end, rows, errors, _, error, key, method, path, payloads in seen:
            kind = (labels, version, status, rows, errors, error, key, method, path)
            if payloads is not None:
                head, tail = self._around(kind, payloads)  # bodies differ: never kept
            else:
                found = parts.get(kind)
                if found is None:
                    if len(parts) >= LINE_CACHE:
                        parts.clear()
                    found = parts[kind] = self._around(kind, None)
                head, tail = found
            # Milliseconds with three decimals, as `%d.%03d` of the microseconds: a float's repr costs more.
            lines += (b'{"ts":"', self.timestamp(epoch + end), b'",', head,
                      b"%d.%03d" % divmod(int((end - start) * 1e6), 1000), tail)

    def write(self) -> None:
        """Writes out the lines encoded so far."""
        if not self.lines:
            return
        data = b"".join(self.lines)
        self.lines.clear()
        if self.logger is None:
            self._out(data)
        else:
            for line in data.splitlines():
                self.logger.info(line.decode())

    @staticmethod
    def _out(data: bytes) -> None:
        try:
            sys.stderr.flush()  # what went to stderr before, first
            out = getattr(sys.stderr, "buffer", None)
            if out is None:  # stderr replaced by a text-only stream
                sys.stderr.write(data.decode())
                sys.stderr.flush()
                return
            out.write(data)
            out.flush()
        except (OSError, ValueError):
            pass  # stderr closed or a broken pipe: losing log lines beats failing requests


class Payloads:
    """One request's bodies, as far as the log keeps them (`server.log_payloads`)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.request = bytearray()
        self.response = bytearray()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and len(self.request) < PAYLOAD_LOG_LIMIT:
            self.request += message.get("body", b"")
        return message

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.body" and len(self.response) < PAYLOAD_LOG_LIMIT:
            self.response += message.get("body", b"")
        return self._send(message)
