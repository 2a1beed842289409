"""Running a parsed call against one loaded version.

A sync function runs off the event loop, a whole batch in one hop, on a
thread pool owned by that version: a deployment that blocks can only use up
its own threads, never those of others. `async def` functions are awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from framework import encoding
from framework.errors import CallTimeout, DeploymentFailed, RowsFailed
from framework.packaging import Loaded
from framework.protocol import Binder, Call, error_text, sort_key

log = logging.getLogger("framework.runtime")

Outcome = tuple[bool, Any]  # (True, result) or (False, "ValueError: ...")


class Runner:
    def __init__(self, loaded: Loaded, *, threads: int) -> None:
        m = loaded.manifest
        self.fn = loaded.fn
        self.manifest = m
        self.label = f"{m['name']} v{m['version']} ({m['branch']})"
        self.binder = Binder(self.fn)
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix=f"{m['name']}-v{m['version']}")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _failed(self, exc: Exception, row_id: Any = None) -> str:
        where = self.label if row_id is None else f"{self.label} row {row_id!r}"
        log.error("%s raised", where, exc_info=exc)
        return error_text(exc)

    # -- sync ---------------------------------------------------------------

    def _rows_sync(self, rows: list[list[Any]]) -> list[Outcome]:
        fn, bind = self.fn, self.binder.row
        out: list[Outcome] = []
        for row in rows:
            try:
                args, kwargs = bind(row[1:])
                out.append((True, fn(*args, **kwargs)))
            except Exception as exc:  # noqa: BLE001 - every row runs, whatever the others do
                out.append((False, self._failed(exc, row[0])))
        return out

    def _single_sync(self, data: Any) -> Outcome:
        try:
            args, kwargs = self.binder.single(data)
            return True, self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            return False, self._failed(exc)

    # -- async --------------------------------------------------------------

    async def _one_async(self, args: tuple[Any, ...], kwargs: dict[str, Any], row_id: Any) -> Outcome:
        try:
            return True, await self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            return False, self._failed(exc, row_id)

    async def _rows_async(self, rows: list[list[Any]]) -> list[Outcome]:
        calls = []
        for row in rows:
            args, kwargs = self.binder.row(row[1:])
            calls.append(self._one_async(args, kwargs, row[0]))
        return list(await asyncio.gather(*calls))

    async def _single_async(self, data: Any) -> Outcome:
        args, kwargs = self.binder.single(data)
        return await self._one_async(args, kwargs, None)

    # -- entry --------------------------------------------------------------

    async def run(self, call: Call, timeout: float) -> tuple[int, bytes]:
        """Run `call`; returns (status, body) or raises a FrameworkError."""
        if self.is_async:
            work = self._rows_async(call.rows) if call.batch else self._single_async(call.data)
        else:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(
                self.executor,
                *((self._rows_sync, call.rows) if call.batch else (self._single_sync, call.data)),
            )
        try:
            outcome = await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(
                f"{self.label} did not answer within {timeout:g} s; send a larger "
                '"timeout_seconds" or a smaller batch'
            ) from None
        if call.batch:
            return 200, self._batch_body(call, outcome)
        ok, value = outcome
        if ok:
            try:
                return 200, encoding.dumps({"data": value})
            except TypeError:
                value = encoding.unencodable(value)
        raise DeploymentFailed(value)

    def _batch_body(self, call: Call, outcomes: list[Outcome]) -> bytes:
        pairs = sorted(zip(call.ids, outcomes), key=lambda p: sort_key(p[0]))
        data = [[i, v] for i, (ok, v) in pairs if ok]
        errors = [[i, v] for i, (ok, v) in pairs if not ok]
        try:
            body = encoding.dumps({"data": data, "errors": errors} if call.partial else {"data": data})
        except TypeError:
            bad = {i for i, v in data if encoding.unencodable(v)}
            errors = sorted(
                errors + [[i, encoding.unencodable(v)] for i, v in data if i in bad],
                key=lambda e: sort_key(e[0]),
            )
            data = [[i, v] for i, v in data if i not in bad]
            body = None
        if errors and not call.partial:
            first_id, first_error = errors[0]
            raise RowsFailed(
                f"{len(errors)} of {len(call.ids)} rows failed; first failed id "
                f"{first_id!r}:\n{first_error}",
                data,
                errors,
            )
        return body if body is not None else encoding.dumps({"data": data, "errors": errors})
