"""What `framework serve` sets up in its server processes.

uvicorn's HTTP protocol, with two changes to how a connection writes:

- Nagle's algorithm off on every connection. `uvicorn --workers N` binds its
  listening socket without naming TCP as the protocol, and asyncio only sets
  TCP_NODELAY on accepted sockets whose protocol says TCP. uvicorn writes a
  response in two pieces (head, then body), so with Nagle on the body waits
  for the client's delayed ACK on keep-alive connections (`NoDelay`).
- Those two pieces in one send (`OneWrite`): the head is held until the
  body's write, in the same turn of the event loop, or until the next turn.

And the garbage collector, tuned for a process that only serves (`tune_gc`).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any, Iterable

from uvicorn.protocols.http.auto import AutoHTTPProtocol

# Collect the youngest objects every this many new containers, not CPython's 700: a
# large batch allocates tens of thousands, and each collection promotes its live rows
# and walks them again in the older generations.
GC_YOUNGEST = 10_000


class OneWrite:
    """A connection's transport that holds a write until the next one, or at most until
    the loop's next turn, and sends both in one system call. uvicorn writes a response's
    head and then its body with nothing awaited between them; sending them apart cost a
    second send, and a second segment for the client to read. The order of the bytes is
    never changed: one write at most is held, and every other operation sends it first."""

    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self.flush)  # a head whose body waits (a stream) goes out anyway
        else:
            self._held = None
            self._transport.writelines((held, data))

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def writelines(self, data: Iterable[bytes]) -> None:
        self.flush()
        self._transport.writelines(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def is_closing(self) -> bool:  # asked once per response: a method, not `__getattr__`'s fallback
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:  # the rest is the transport's own
        return getattr(self._transport, name)


class NoDelay(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's protocol with TCP_NODELAY on every connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


class HTTPProtocol(NoDelay):
    """The protocol `framework serve` runs: `NoDelay`, writing through `OneWrite`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(OneWrite(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]


def tune_gc() -> None:
    """For a process that only serves, once its app is built: what exists by then
    (modules, settings) is never garbage, so the collector stops walking it, and it
    runs every `GC_YOUNGEST` new objects."""
    # Without a gc.collect() first: it would slow every start, to spare the little
    # garbage there is by then.
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST, *gc.get_threshold()[1:])
