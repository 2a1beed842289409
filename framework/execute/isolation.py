"""A version run in warm worker processes (`@deployment(isolation="process")`).

The server side of `framework.execute.worker`'s protocol. Each of the version's
`concurrency` workers has a task on the event loop that takes the calls
queued for the version (all of them at once when there is one worker),
sends them in one message and reads the answers as they come, from the
worker's pipes (`framework.execute.process.Pipes`): no thread of the server
is woken for an isolated call. That task also enforces time limits: a call
still running at its deadline gets its worker killed and replaced (the
caller gets 504), and a worker that dies fails only the call it was
running. The calls behind either one never started, so they are sent to
the new worker as they are: no call ever runs twice. Starting, stopping and
reaping a worker, which can take seconds, run on threads of their own.

A request with no options travels as its raw body (`Runner.run_body`): the
worker parses it, runs it and encodes the answer, so the server only
forwards bytes, and the rows are never pickled on one side and unpickled on
the other. A vectorized version's worker may gather such requests into one
call (`framework.execute.gathering`), and says so first: a crash or a time
limit then fails every request that call held.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, TypeVar

from framework.errors import CallTimeout, WorkerCrashed
from framework.execute.process import Pipes, Worker
from framework.execute.threads import _Handoff, settle

log = logging.getLogger("framework.runtime")

MAX_MESSAGE_CALLS = 256  # calls sent to a worker in one message, at most

T = TypeVar("T")


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread of its own: starting or stopping a worker can take seconds,
    and the loop's default pool is the store's."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result: Any = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, future, *result)
        except RuntimeError:  # the loop has closed: nobody waits
            pass

    threading.Thread(target=run, daemon=True).start()
    return await future


class ProcessLane:
    """Runs `Calls.<kind>(arg)` of one version in `size` worker processes."""

    def __init__(self, size: int, label: str, artifact: bytes, manifest: dict[str, Any],
                 python: str = sys.executable, nice: int = 0) -> None:
        """`nice`: how much lower than this process's the workers' CPU priority is."""
        self.size = size
        self.label = label
        self._spawn_args = (label, artifact, manifest, python, nice)
        self.closed = False
        self._first: Worker | None = Worker(*self._spawn_args)  # load errors reach the loader at once
        self.signature = self._first.signature
        self.is_async = self._first.is_async
        self.pids: list[int] = [self._first.proc.pid]  # every worker started, for logs and tests
        self._queue: deque[_Handoff] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # serving tasks waiting for a call
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, kind: str, arg: Any, deadline: float) -> asyncio.Future[Any]:
        """The future of the call, run unless it is past `deadline` (monotonic) or
        cancelled before it is sent."""
        loop = asyncio.get_running_loop()
        if self._loop is None:  # the lane is built off the loop; its tasks start with the first call
            self._loop = loop
            first, self._first = self._first, None
            for n in range(self.size):
                self._start(first if n == 0 else None)
        elif loop is not self._loop:
            raise RuntimeError(f"{self.label}: a worker lane serves one event loop, its first caller's")
        future = loop.create_future()
        self._queue.append(_Handoff(kind, arg, deadline, future))
        if self.closed and not self._tasks:  # a late call to an evicted version still runs
            self._start(None)
        self._wake(all_=False)
        return future

    def close(self) -> None:
        """Stop the workers once the calls queued so far are done. From any thread."""
        self.closed = True
        if self._loop is None:  # never called: only the first worker to stop
            first, self._first = self._first, None
            if first is not None:
                threading.Thread(target=first.stop, daemon=True).start()
            return
        try:
            self._loop.call_soon_threadsafe(self._wake, True)
        except RuntimeError:  # the loop has closed: the workers saw EOF with the server's exit
            pass

    def _wake(self, all_: bool) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_:
                    return

    def _start(self, worker: Worker | None) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(worker), name=f"{self.label}-worker")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take(self, pending: deque[_Handoff]) -> list[_Handoff] | None:
        """The next calls to send (None: closed); with one worker, every call queued."""
        while not pending:
            if self._queue:
                pending.append(self._queue.popleft())
            elif self.closed:
                return None
            else:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                await waiter
        if self.size == 1:
            while self._queue and len(pending) < MAX_MESSAGE_CALLS:
                pending.append(self._queue.popleft())
        now = time.monotonic()
        batch = []
        while pending and (self.size == 1 or not batch):
            handoff = pending.popleft()
            if not handoff.future.cancelled() and now < handoff.deadline:
                batch.append(handoff)
        return batch

    async def _serve(self, worker: Worker | None) -> None:
        pending: deque[_Handoff] = deque()
        pipes: Pipes | None = None
        try:
            while True:
                batch = await self._take(pending)
                if batch is None:
                    return
                if not batch:
                    continue
                if pipes is None:
                    try:
                        if worker is None:
                            worker = await _off_loop(Worker, *self._spawn_args)
                            self.pids.append(worker.proc.pid)
                        pipes = await Pipes.open(*worker.pipes())
                    except Exception as exc:  # noqa: BLE001 - every call waiting gets the load error
                        for handoff in batch:
                            settle(handoff.future, False, exc)
                        if worker is not None:  # its pipes could not be opened here: not usable
                            threading.Thread(target=worker.stop, daemon=True).start()
                            worker = None
                        continue
                assert worker is not None
                if not await self._exchange(worker, pipes, batch, pending):
                    worker, pipes = None, None  # killed or dead: the next calls start a new one
        except Exception as exc:  # noqa: BLE001 - ours, not the user's: fail what this task held, once
            log.exception("%s: the task serving a worker failed; starting another", self.label)
            for handoff in pending:
                settle(handoff.future, False, RuntimeError(f"{self.label}: {exc!r}"))
            if not self.closed:
                self._start(None)
        finally:
            if pipes is not None:
                pipes.close()  # the worker sees EOF and exits
            if worker is not None:
                threading.Thread(target=worker.reap if pipes is not None else worker.stop,
                                 daemon=True).start()

    async def _kill(self, worker: Worker, pipes: Pipes) -> None:
        pipes.close()
        await _off_loop(worker.reap, 0.0)

    async def _exchange(self, worker: Worker, pipes: Pipes, batch: list[_Handoff],
                        pending: deque[_Handoff]) -> bool:
        """Send `batch`, answer each call as it comes; False if the worker is gone."""
        try:
            sent = pipes.send(("call", [(h.kind, h.arg, h.deadline) for h in batch]))
        except Exception as exc:  # noqa: BLE001 - the call's data does not pickle
            for handoff in batch:
                settle(handoff.future, False, exc)
            return True
        if not sent:  # a broken pipe: nothing reached the worker, all of it goes to a new one
            pending.extendleft(reversed(batch))
            await self._kill(worker, pipes)
            return False
        index, last, deadline = 0, 0, batch[0].deadline  # `last`: the last call the running one holds
        while index < len(batch):
            handoff = batch[index]
            if index > last:
                last, deadline = index, handoff.deadline
            try:
                async with asyncio.timeout(None if deadline == float("inf")
                                           else max(deadline - time.monotonic(), 0.0)):
                    answer = await pipes.receive()
            except TimeoutError:
                await self._kill(worker, pipes)
                error: Exception = CallTimeout(
                    f"{self.label} did not answer within its time limit; its worker process "
                    'was stopped and replaced. Send a larger "timeout_seconds" or a smaller batch'
                )
            except (EOFError, OSError):
                pipes.close()
                death = await _off_loop(worker.death)
                log.error("%s: %s while running a call; starting a new one", self.label, death)
                await _off_loop(worker.reap, 0.0)
                held = ("a micro-batch that held this request (a failed micro-batch fails every "
                        "request it held)" if last > index else "this call")
                error = WorkerCrashed(
                    f"{self.label} crashed: {death} while running {held}; the other calls "
                    "queued for it are unaffected. Fix the deployment, or send other inputs"
                )
            else:
                if answer[0] == "group":  # the next call holds this request and those after it
                    last = index + answer[1] - 1
                    # Stopped only once every caller it holds has given up.
                    deadline = max(h.deadline for h in batch[index:last + 1])
                    continue
                if answer[0] == "done":
                    settle(handoff.future, answer[1], answer[2] if answer[1] else RuntimeError(answer[2]))
                index += 1  # "expired": its caller's own timer answers it
                continue
            # The worker is gone: the running call fails, with every request it held, and the
            # calls behind them, which never started, go to the next worker.
            for failed in batch[index:last + 1]:
                settle(failed.future, False, error)
            pending.extendleft(reversed(batch[last + 1:]))
            return False
        return True
