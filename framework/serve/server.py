"""What `framework serve` sets up in its server processes.

uvicorn's HTTP protocol, with Nagle's algorithm off on every connection:

`uvicorn --workers N` binds its listening socket without naming TCP as the
protocol, and asyncio only sets TCP_NODELAY on accepted sockets whose
protocol says TCP. uvicorn writes a response in two pieces (head, then body),
so with Nagle on the body waits for the client's delayed ACK on keep-alive
connections. Setting the option per connection fixes it in every mode.

And the garbage collector, tuned for a process that only serves (`tune_gc`).
"""

from __future__ import annotations

import asyncio
import gc
import socket

from uvicorn.protocols.http.auto import AutoHTTPProtocol

# Collect the youngest objects every this many new containers, not CPython's 700: a
# large batch allocates tens of thousands, and each collection promotes its live rows
# and walks them again in the older generations.
GC_YOUNGEST = 10_000


class HTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def tune_gc() -> None:
    """For a process that only serves, once its app is built: what exists by then
    (modules, settings) is never garbage, so the collector stops walking it, and it
    runs every `GC_YOUNGEST` new objects."""
    # Without a gc.collect() first: it would slow every start, to spare the little
    # garbage there is by then.
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST, *gc.get_threshold()[1:])
