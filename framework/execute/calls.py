"""The work of one call over a loaded function, and the answer it makes.

These are plain sync functions with no event loop in them: the same code
runs on a version's thread, on the event loop (`inline=True`), and in a
worker process (`isolation="process"`), so a deployment behaves alike in
every mode. An answer is a small tuple rather than an exception, so that it
crosses a process boundary as it is:

- `(200, body, failed)`: the JSON body, and how many rows failed (partial);
- `(422, message, errors)`: rows failed (`errors` as `[[id, error], ...]`)
  or, with `errors` None, a single call failed.

A worker process also takes a request's raw body (`Calls.body`), so that the
rows cross the pipe as the bytes they came in, not as pickled objects.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from itertools import starmap
from operator import itemgetter
from typing import Any, Callable, Iterator

from framework import encoding
from framework.errors import BadRequest, PayloadTooLarge
from framework.protocol import Binder, Call, error_text, parse

log = logging.getLogger("framework.runtime")

Answer = tuple[int, Any, Any]
# What `Calls.body` returns: (answer, batch, rows), or (None, error class name, message).
Received = tuple[Answer | None, Any, Any]
Outcome = tuple[bool, Any]  # (True, result) or (False, "ValueError: ...")
# Sync user code may raise anything (SystemExit included): it is that row's failure.
SYNC_ERRORS = BaseException
# At most this many distinct tracebacks are logged for one request's failed rows.
LOGGED_TRACEBACKS = 3
_ARG = itemgetter(1)
_ARGS = itemgetter(slice(1, None))


class Failures:
    """The failed rows of one request, logged as one record when it is done."""

    __slots__ = ("label", "count", "first_id", "seen", "texts")

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self.first_id: Any = None
        self.seen: set[str] = set()
        self.texts: list[str] = []

    def add(self, exc: BaseException, row_id: Any) -> str:
        text = error_text(exc)
        self.count += 1
        if self.count == 1:
            self.first_id = row_id
        kind = f"{type(exc).__qualname__}:{text[:200]}"
        if len(self.texts) < LOGGED_TRACEBACKS and kind not in self.seen:
            self.seen.add(kind)
            self.texts.append("".join(traceback.format_exception(exc)).rstrip())
        return text

    def log(self, rows: int) -> None:
        if self.count:
            where = "" if self.first_id is None else f"; first failed id {self.first_id!r}"
            log.error("%s: %d of %d row(s) failed%s\n%s", self.label, self.count, rows, where,
                      "\n".join(self.texts))


class Calls:
    """A loaded function, called as the protocol says."""

    def __init__(self, fn: Callable[..., Any], label: str) -> None:
        self.fn = fn
        self.label = label
        self.binder = Binder(fn)

    def _call_row(self, row: list[Any]) -> Any:
        args, kwargs = self.binder.row(row[1:])
        return self.fn(*args, **kwargs)

    def _mapped(self, rows: list[list[Any]]) -> Iterator[Any]:
        """The function applied to each row, iterated in C where the rows allow it."""
        lengths = set(map(len, rows))
        if len(lengths) == 1 and not (self.binder.several and 2 in lengths):  # no kwargs dict
            if 2 in lengths:
                return map(self.fn, map(_ARG, rows))
            return starmap(self.fn, map(_ARGS, rows))
        return map(self._call_row, rows)

    def rows(self, rows: list[list[Any]]) -> tuple[list[Any], dict[int, str]]:
        """Every row's result (None where it failed), and the failures by row index.
        Each row runs once, whatever the others do."""
        results: list[Any] = []
        calls = self._mapped(rows)
        first: BaseException | None = None
        try:
            results.extend(calls)  # keeps what it got before a row raised
        except SYNC_ERRORS as exc:
            first = exc  # handled below, not in here: it would be the context of the next ones
        if first is None:
            if len(results) == len(rows):  # the common case: no row failed, nothing to log
                return results, {}
            first = StopIteration()  # map() ends early when a row raises StopIteration
        return self._failing(rows, results, calls, first)

    def _failing(self, rows: list[list[Any]], results: list[Any], calls: Iterator[Any],
                 exc: BaseException) -> tuple[list[Any], dict[int, str]]:
        """`rows` from the row at `len(results)`, which raised `exc`, on."""
        failures = Failures(self.label)
        failed = {len(results): failures.add(exc, rows[len(results)][0])}
        results.append(None)
        while len(results) < len(rows):  # each turn adds at least one row
            try:
                results.extend(calls)
                if len(results) == len(rows):
                    break
                failed[len(results)] = failures.add(StopIteration(), rows[len(results)][0])
            except SYNC_ERRORS as exc:
                failed[len(results)] = failures.add(exc, rows[len(results)][0])
            results.append(None)
        failures.log(len(rows))
        return results, failed

    def single(self, data: Any) -> Outcome:
        try:
            args, kwargs = self.binder.single(data)
            return True, self.fn(*args, **kwargs)
        except SYNC_ERRORS as exc:
            failures = Failures(self.label)
            text = failures.add(exc, None)
            failures.log(1)
            return False, text

    def vector(self, rows: list[list[Any]]) -> Outcome:
        """One call of a vectorized function over a micro-batch's rows `[id, *arguments]`,
        passed as whole columns: made here, on the thread or in the worker that calls it."""
        try:
            return vector_result(self.label, self.fn(*columns(rows)), len(rows))
        except SYNC_ERRORS as exc:
            failures = Failures(self.label)
            text = failures.add(exc, None)
            failures.log(len(rows))
            return False, text

    def answer(self, call: Call) -> Answer:
        """A whole request: run it, and encode its answer."""
        if call.batch:
            return batch_answer(call, *self.rows(call.rows))
        return single_answer(*self.single(call.data))

    def body(self, arg: tuple[bytes, int | None]) -> Received:
        """A whole request from its raw body and the server's `max_rows`: parsed here, then as
        `answer`; with whether it was a batch and its rows, which the server's metrics count."""
        body, max_rows = arg
        try:
            call = parse(body, max_rows)
        except (BadRequest, PayloadTooLarge) as exc:  # the server answers them as its own
            return None, type(exc).__name__, str(exc)
        return self.answer(call), call.batch, len(call.ids) if call.batch else 1


def columns(rows: list[list[Any]]) -> list[list[Any]]:
    """One list per parameter, from rows `[id, *arguments]`."""
    return [list(column) for column in zip(*rows)][1:]


def signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def vector_rows(binder: Binder, signature: inspect.Signature | None, label: str,
                rows: list[list[Any]]) -> tuple[list[list[Any]], dict[int, str]]:
    """Rows as `[id, *every positional argument]` of a vectorized function, and the errors
    of the rows that do not fit its signature, by index."""
    if signature is None:
        return rows, {}
    width = len(signature.parameters) + 1
    if set(map(len, rows)) <= {width}:
        return rows, {}
    good, failed = [], {}
    failures = Failures(label)
    for index, row in enumerate(rows):
        try:
            args, kwargs = binder.row(row[1:])
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            good.append([row[0], *bound.arguments.values()])
        except TypeError as exc:
            failed[index] = failures.add(exc, row[0])
    failures.log(len(rows))
    return good, failed


def vector_rows_of(binder: Binder, call: Call) -> list[list[Any]]:
    """A vectorized function's rows for `call`: a single call is a one-row batch."""
    if call.batch:
        return call.rows
    args, kwargs = binder.single(call.data)
    # A single call's arguments as a row's: keyword arguments travel as one dict.
    return [[None, kwargs] if kwargs else [None, *args]]


def merge_unbound(n: int, unbound: dict[int, str], results: list[Any],
                  failed: dict[int, str]) -> tuple[list[Any], dict[int, str]]:
    """The results of `n` rows, from those of the rows that were bound (`vector_rows`),
    with the unbound ones' errors put back in their places."""
    if not unbound:
        return results, failed
    ran = iter(range(n - len(unbound)))
    merged, errors = [], {}
    for index in range(n):
        at = None if index in unbound else next(ran)
        merged.append(None if at is None else results[at])
        if at is None or at in failed:
            errors[index] = unbound[index] if at is None else failed[at]
    return merged, errors


def vector_answer(call: Call, results: list[Any], failed: dict[int, str]) -> Answer:
    """The answer to `call` from its rows' outcomes in a vectorized call."""
    if call.batch:
        return batch_answer(call, results, failed)
    return single_answer(False, failed[0]) if failed else single_answer(True, results[0])


def vector_result(label: str, out: Any, n: int) -> Outcome:
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy arrays, pandas series
    if isinstance(out, (list, tuple)) and len(out) == n:
        return True, out
    got = f"{len(out)} results" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
    error = (f"TypeError: vectorized deployment {label} returned {got} for {n} rows; "
             "return a list with one result per row, in row order")
    log.error("%s", error)
    return False, error


def single_answer(ok: bool, value: Any) -> Answer:
    if ok:
        try:
            return 200, encoding.dumps({"data": value}), 0
        except TypeError:
            value = encoding.unencodable(value)
    return 422, value, None


def batch_answer(call: Call, results: list[Any], failed: dict[int, str]) -> Answer:
    ids = call.ids
    if failed:
        data = [(i, v) for n, (i, v) in enumerate(zip(ids, results)) if n not in failed]
        errors = sorted(((ids[n], e) for n, e in failed.items()), key=call.order)
    else:
        data, errors = list(zip(ids, results)), []
    if len(data) > 1:
        data.sort(key=call.order)  # linear when the ids came in order
    try:
        body = encoding.dumps({"data": data, "errors": errors} if call.partial else {"data": data})
    except TypeError:
        bad = {i: e for i, v in data if (e := encoding.unencodable(v))}
        errors = sorted(errors + list(bad.items()), key=call.order)
        data = [(i, v) for i, v in data if i not in bad]
        body = None
    if errors and not call.partial:
        first_id, first_error = errors[0]
        message = f"{len(errors)} of {len(ids)} rows failed; first failed id {first_id!r}:\n{first_error}"
        return 422, message, [list(e) for e in errors]
    if body is None:
        body = encoding.dumps({"data": data, "errors": errors})
    return 200, body, len(errors)
