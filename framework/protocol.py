"""Modelbit's REST inference protocol: where a request body is parsed.

Pure functions over bytes and Python values, with no HTTP in them: the
runtime app turns what these raise into status codes.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable

import orjson

from framework.errors import BadRequest, PayloadTooLarge

# Bodies over this many bytes are parsed on a thread, not on the event loop: parsing
# takes time in proportion to the size, and on the loop a body of tens of megabytes
# stalled every other request for seconds.
LARGE_BODY = 1 << 20


@dataclass
class Call:
    """A parsed request: a single call, or batch rows as (id, args)."""

    batch: bool
    data: Any
    ids: list[Any]
    rows: list[list[Any]]
    partial: bool
    timeout: float | None
    # Sorts (id, value) pairs in protocol order; plain id order unless ids mix types.
    order: Callable[[Any], Any] = itemgetter(0)
    # Rows that failed, set by the runner once a batch has run (for metrics and logs).
    failed: int = 0
    # Modelbit's asynchronous and large-answer options (framework.serve.jobs, framework.serve.links).
    webhook: str | None = None
    webhook_ignore_timeout: bool = False
    response_format: str | None = None


def _is_id(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (int, str))


# Digits to "0", every other byte to ".": a body with 19 digits in a row may hold an
# integer orjson cannot read exactly (beyond 64 bits, it reads a float).
_DIGITS = bytes(48 if 48 <= b <= 57 else 46 for b in range(256))
_LONG_RUN = b"0" * 19


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise BadRequest(f"the integer {shown} is beyond 64 bits; send it as a string")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def long_int_possible(body: bytes) -> bool:
    """Whether `body` has 19 digits in a row: an integer orjson may not read exactly."""
    return _LONG_RUN in body.translate(_DIGITS)  # one C-level pass, cheap next to parsing


def _loads(body: bytes) -> Any:
    """orjson's reading of `body`, or Python's, where it may hold an integer beyond 64 bits:
    refused, rather than read as a float (a changed id, a wrong result)."""
    if not long_int_possible(body):
        return orjson.loads(body)
    return json.loads(body, parse_int=_int64, parse_constant=_constant)


# The names of the request's options (`_options`). No JSON escape but \u can spell them.
_OPTION_NAMES = (b'"batch"', b'"partial"', b'"timeout_seconds"', b'"response_webhook',
                 b'"response_format"')


# What a piece of a body scanned on its own must share with the next (`serve.bigbody`).
OPTION_OVERLAP = max(map(len, _OPTION_NAMES)) - 1


def only_data(body: bytes) -> bool:
    """Whether `body` cannot ask for any option but the defaults: it names none, and holds
    no escape that could spell one. What it holds may still be invalid."""
    return b"\\u" not in body and not any(name in body for name in _OPTION_NAMES)


def parse(body: bytes, max_rows: int | None = None) -> Call:
    """Parse a request body, whatever its Content-Type said; a batch of more than
    `max_rows` rows raises PayloadTooLarge."""
    return call_from(document(body), max_rows)


def document(body: bytes) -> dict[str, Any]:
    """The body's JSON object, which has a "data" key; else BadRequest."""
    try:
        doc = _loads(body)
    except RecursionError:  # Python's json recurses once per level; orjson stops at 1,024
        raise _too_deep() from None
    except ValueError as exc:  # orjson's and json's JSONDecodeError, a UnicodeDecodeError
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise _too_deep() from None
        raise BadRequest(
            f'request body is not valid JSON ({exc}); send {{"data": ...}}'
        ) from None
    if not isinstance(doc, dict) or "data" not in doc:
        raise BadRequest('request body must be a JSON object with a "data" key, e.g. {"data": [[1, 10]]}')
    return doc


def call_from(doc: dict[str, Any], max_rows: int | None = None,
              checked: tuple[list[Any], set[type]] | None = None) -> Call:
    """The call a body's object asks for. `checked`: the ids and their types, from
    rows already known to be lists with valid, unique ids."""
    data = doc["data"]
    # Most bodies hold `data` alone, with no options to check.
    batch_opt, partial, timeout, later = (None, False, None, None) if len(doc) == 1 else _options(doc)
    is_list = isinstance(data, list)
    if is_list and checked is None and len(data) == 1 and type(data[0]) is list:
        # The commonest batch, one row: its checks without the sets `fast_ids` builds.
        all_lists, row = True, data[0]
        if row and type(row[0]) in _ID_TYPES:
            checked = [row[0]], {type(row[0])}
    else:
        all_lists = is_list and (checked is not None or set(map(type, data)) <= {list})
    if batch_opt is None:
        batch = all_lists
    elif batch_opt and not is_list:
        raise BadRequest('"batch": true needs "data" to be a list of rows [id, args...]')
    else:
        batch = batch_opt
    if not batch:
        return _answered_later(Call(False, data, [], [], partial, timeout), later)
    if max_rows is not None and len(data) > max_rows:
        raise PayloadTooLarge(
            f"the batch has {len(data)} rows, over the server's limit of {max_rows} "
            "(server.max_rows); split it into smaller requests"
        )
    if checked is None and all_lists:
        checked = fast_ids(data)
    ids, kinds = checked if checked is not None else _checked_ids(data)
    mixed = len(kinds) > 1 and str in kinds
    order = pair_order if mixed else itemgetter(0)
    return _answered_later(Call(True, data, ids, data, partial, timeout, order), later)


def _too_deep() -> BadRequest:
    return BadRequest(
        "request body is nested too deeply (JSON arrays and objects over about 1,000 levels "
        "deep are refused); send flatter data"
    )


def _answered_later(call: Call, later: tuple[str | None, bool, str | None] | None) -> Call:
    if later is not None:
        call.webhook, call.webhook_ignore_timeout, call.response_format = later
    return call


def _options(doc: dict[str, Any]) -> tuple[bool | None, bool, float | None,
                                           tuple[str | None, bool, str | None] | None]:
    """The request's `batch`, `partial`, `timeout_seconds` and webhook and format options, checked."""
    batch_opt = doc.get("batch")
    if batch_opt is not None and not isinstance(batch_opt, bool):
        raise BadRequest(f'"batch" must be true or false, got {_short(batch_opt)}')
    partial = doc.get("partial", False)
    if not isinstance(partial, bool):
        raise BadRequest(f'"partial" must be true or false, got {_short(partial)}')
    timeout = doc.get("timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise BadRequest(f'"timeout_seconds" must be a positive number, got {_short(timeout)}')
    webhook = doc.get("response_webhook")
    if webhook is not None and (not isinstance(webhook, str) or not webhook):
        raise BadRequest(f'"response_webhook" must be a URL string, got {_short(webhook)}')
    ignore = doc.get("response_webhook_ignore_timeout")
    if ignore is not None and not isinstance(ignore, bool):
        raise BadRequest(f'"response_webhook_ignore_timeout" must be true or false, got {_short(ignore)}')
    if ignore is not None and webhook is None:
        raise BadRequest('"response_webhook_ignore_timeout" needs a "response_webhook"; add one or drop it')
    fmt = doc.get("response_format")
    if fmt not in (None, "json", "links"):
        raise BadRequest(f'"response_format" must be "links" or "json", got {_short(fmt)}')
    later = (webhook, bool(ignore), None if fmt == "json" else fmt)
    return batch_opt, partial, timeout, later if webhook is not None or fmt == "links" else None


_ID_TYPES = {int, float, str}


def fast_ids(data: list[list[Any]]) -> tuple[list[Any], set[type]] | None:
    """The ids of rows known to be lists, and their types, checked with C-level
    builtins only; None if unsure.

    JSON parsing never yields a non-finite float, so float ids need no check.
    """
    try:
        ids = list(map(itemgetter(0), data))
    except IndexError:
        return None
    kinds = set(map(type, ids))
    if not kinds <= _ID_TYPES or len(set(ids)) != len(ids):
        return None
    return ids, kinds


def pair_order(pair: Any) -> tuple[int, Any]:
    """`sort_key` of an `[id, value]` pair."""
    return sort_key(pair[0])


def _checked_ids(data: list[Any]) -> tuple[list[Any], set[type]]:
    """Row by row: raises BadRequest naming the first bad row."""
    ids: list[Any] = []
    seen: set[Any] = set()
    for index, row in enumerate(data):
        if not isinstance(row, list) or not row:
            raise BadRequest(
                f"row {index} must be a non-empty list [id, args...], got {_short(row)}"
            )
        row_id = row[0]
        if not _is_id(row_id):
            raise BadRequest(
                f"row {index} has an invalid id {_short(row_id)}: an id is a string or a number"
            )
        if row_id in seen:
            raise BadRequest(f"id {row_id!r} appears more than once (row {index}); ids must be unique")
        seen.add(row_id)
        ids.append(row_id)
    return ids, set(map(type, ids))


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # repr recurses once per level, as Python's json does
        return "a value nested too deeply to show"
    return text if len(text) <= 60 else text[:57] + "..."


def sort_key(row_id: Any) -> tuple[int, Any]:
    """Numbers first in numeric order, then strings in lexicographic order."""
    return (1, row_id) if isinstance(row_id, str) else (0, row_id)


class Binder:
    """Turns a row's arguments into (args, kwargs) for one function's signature."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [
            p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self.varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        self.max_pos = len(positional)
        self.min_pos = sum(1 for p in positional if p.default is p.empty)
        self.names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.several = self.max_pos > 1 or self.varargs

    def _as_kwargs(self, value: Any) -> bool:
        return (
            self.several
            and isinstance(value, dict)
            and bool(value)
            and all(isinstance(k, str) and k in self.names for k in value)
        )

    def row(self, args: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) == 1 and self._as_kwargs(args[0]):
            return (), args[0]
        return tuple(args), {}

    def single(self, data: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if (
            self.several
            and isinstance(data, list)
            and self.min_pos <= len(data)
            and (self.varargs or len(data) <= self.max_pos)
        ):
            return tuple(data), {}
        if self._as_kwargs(data):
            return (), data
        return (data,), {}


def error_text(exc: BaseException) -> str:
    """`ValueError: message` on one line: what a caller is shown of a failure."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
