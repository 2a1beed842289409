"""Reading a big batch body in pieces, so that the event loop keeps running meanwhile.

The runtime parses bodies over `protocol.LARGE_BODY` on a thread; but orjson,
like every JSON parser here, holds the GIL for the whole of one call, so one
call on a body of tens of megabytes stalls the event loop as if it ran there.
A batch sent as `{"data": [[...], [...], ...], ...}` is therefore cut between
two rows (`],[`) about every `PIECE_BYTES`, and each piece is parsed and
checked by calls of its own: between two of them the loop gets the GIL back.

A cut is only a guess (`],[` may sit inside a string, or inside a row's own
lists), but a safe one: the pieces are exactly the text of the array's
elements if and only if each of them parses on its own, JSON's grammar being
read left to right with nothing carried over a `,` between two elements.
Anything this does not handle (a body of another shape, a cut that does not
parse, a second "data" key, a possible integer beyond 64 bits) goes to
`protocol.parse` whole, which answers exactly as for a small body.

`only_data` looks for option names in pieces too, a megabyte at a time, for a
body that goes to a worker process unparsed if it names none.
"""

from __future__ import annotations

import asyncio
import re
from operator import itemgetter
from typing import Any

import orjson

from framework import protocol

PIECE_BYTES = 1 << 18
SCAN_BYTES = 1 << 20
_HEAD = re.compile(rb'\s*\{\s*"data"\s*:\s*\[')
_CUT = re.compile(rb"\]\s*,\s*\[")
_ID_TYPES = {int, float, str}


async def only_data(body: bytes) -> bool:
    """`protocol.only_data(body)`, read about every SCAN_BYTES with a turn of the event loop
    between two reads: over tens of megabytes, one read holds the GIL for a tenth of a second.
    Each piece also holds the start of the next, so a name across a cut is still found."""
    for at in range(0, len(body), SCAN_BYTES):
        if not protocol.only_data(body[at:at + SCAN_BYTES + protocol.OPTION_OVERLAP]):
            return False
        await asyncio.sleep(0)
    return True


def parse_large(body: bytes, max_rows: int | None = None) -> protocol.Call:
    """`protocol.parse(body, max_rows)`, in pieces where the body allows it."""
    head = _HEAD.match(body)
    cuts = _cuts(body, head.end()) if head is not None else None
    if cuts is None:
        return protocol.parse(body, max_rows)
    rows: list[Any] = []
    ids: list[Any] = []
    kinds: set[type] = set()
    seen: set[Any] = set()
    fast = True  # every row so far a list whose id is a valid type, none repeated
    try:
        for at, end in cuts:  # the last piece runs to the end: the object's closing keys
            piece = body[at:end] if end else body[at:]
            if protocol.long_int_possible(piece):
                return protocol.parse(body, max_rows)
            if end:
                part = orjson.loads(b"[" + piece + b"]")
            else:
                doc = orjson.loads(body[:head.end()] + piece)
                part = doc.get("data")
                if not isinstance(part, list):
                    return protocol.parse(body, max_rows)
            rows += part
            fast = fast and _check(part, ids, kinds, seen)
    except orjson.JSONDecodeError:  # a cut inside a string or a row: read it whole
        return protocol.parse(body, max_rows)
    doc["data"] = rows
    return protocol.call_from(doc, max_rows, (ids, kinds) if fast else None)


def _cuts(body: bytes, start: int) -> list[tuple[int, int]] | None:
    """Where the pieces start and end: cut after about every PIECE_BYTES, between `]`
    and `[`; the last one (end 0) runs to the end of the body. None if no cut was
    found, or the tail names "data" again (a repeated key: the last one counts, as
    protocol.parse reads it)."""
    cuts, at = [], start
    while (cut := _CUT.search(body, at + PIECE_BYTES)) is not None:
        cuts.append((at, cut.start() + 1))
        at = cut.end() - 1
    if not cuts or body.find(b'"data"', at) != -1:
        return None
    cuts.append((at, 0))
    return cuts


def _check(part: list[Any], ids: list[Any], kinds: set[type], seen: set[Any]) -> bool:
    """`protocol.fast_ids` for one piece, adding to what the earlier pieces had."""
    if not set(map(type, part)) <= {list}:
        return False
    try:
        new = list(map(itemgetter(0), part))
    except IndexError:
        return False
    kinds |= set(map(type, new))
    if not kinds <= _ID_TYPES:
        return False
    seen.update(new)
    ids += new
    return len(seen) == len(ids)
