"""A version run in warm worker processes (`@deployment(isolation="process")`).

The server side of `framework.execute.worker`'s protocol. Each of the version's
`concurrency` workers has a thread here that takes the calls queued for the
version (all of them at once when there is one worker), sends them in one
message and reads the answers as they come. That thread also enforces time
limits: a call still running at its deadline gets its worker killed and
replaced (the caller gets 504), and a worker that dies fails only the call
it was running. The calls behind either one never started, so they are
sent to the new worker as they are: no call ever runs twice.

A request with no options travels as its raw body (`Runner.run_body`): the
worker parses it, runs it and encodes the answer, so the server only
forwards bytes, and the rows are never pickled on one side and unpickled on
the other. A vectorized version's worker may gather such requests into one
call (`framework.execute.gathering`), and says so first: a crash or a time
limit then fails every request that call held.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from queue import Empty, SimpleQueue
from typing import Any

import cloudpickle

from framework.errors import (
    CallTimeout,
    IncompatibleArtifact,
    IntegrityError,
    LoadFailed,
    WorkerCrashed,
)
from framework.execute.threads import Answers, _Handoff

log = logging.getLogger("framework.runtime")

MAX_MESSAGE_CALLS = 256  # calls sent to a worker in one message, at most
STOP_GRACE_S = 2.0
CLOSED_IDLE_S = 0.05


def _lower_priority(pid: int, nice: int) -> None:
    """Make `pid` `nice` steps nicer than this process. Before the child has loaded
    anything: set from here, it needs nothing from the child's interpreter."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except ProcessLookupError:  # the child is gone already: its load answers for it
        pass
    except OSError as exc:
        log.warning("could not lower the CPU priority of worker %d (server.worker_nice): %s", pid, exc)


class Worker:
    """One child process and the pipes to it."""

    def __init__(self, label: str, artifact: bytes, manifest: dict[str, Any], python: str,
                 nice: int = 0) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            [python, "-m", "framework.execute.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if nice:
            _lower_priority(self.proc.pid, nice)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        try:
            self.send.send(("load", artifact, manifest))
            answer = self.recv.recv()
        except (EOFError, OSError):
            answer = ("error", "load", self.death())
        if answer[0] == "error":
            self.stop()
            kind, message = answer[1], answer[2]
            if kind == "integrity":
                raise IntegrityError(message)
            if kind == "incompatible":
                raise IncompatibleArtifact(message)
            raise LoadFailed(
                f"cannot load {label} in its worker process; deploy a fixed version or roll back "
                f"(`framework rollback {manifest['name']}`):\n{message}"
            )
        self.signature: inspect.Signature | None = cloudpickle.loads(answer[1]) if answer[1] else None
        self.is_async: bool = answer[2]

    def death(self) -> str:
        """How the process ended, once it has."""
        try:
            code = self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            return "its worker process stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"its worker process was killed by {name}"
        return f"its worker process exited with code {code}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def stop(self) -> None:
        self._close_pipes()  # the child sees EOF and exits
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        for conn in (self.send, self.recv):
            try:
                conn.close()
            except OSError:
                pass


class ProcessLane(Answers):
    """Runs `Calls.<kind>(arg)` of one version in `size` worker processes."""

    def __init__(self, size: int, label: str, artifact: bytes, manifest: dict[str, Any],
                 python: str = sys.executable, nice: int = 0) -> None:
        """`nice`: how much lower than this process's the workers' CPU priority is."""
        super().__init__()
        self.size = size
        self.label = label
        self._spawn_args = (label, artifact, manifest, python, nice)
        self.closed = False
        self._calls: SimpleQueue[_Handoff | None] = SimpleQueue()
        first = Worker(*self._spawn_args)  # load errors reach the loader at once
        self.signature = first.signature
        self.is_async = first.is_async
        self.pids: list[int] = [first.proc.pid]  # every worker started, for logs and tests
        self._serving = 0  # threads serving the lane
        self._state = threading.Lock()
        for n in range(size):
            self._serve_in_thread(first if n == 0 else None)

    def _serve_in_thread(self, worker: Worker | None) -> None:
        self._serving += 1
        threading.Thread(target=self._serve, args=(worker,), name=f"{self.label}-worker",
                         daemon=True).start()

    def submit(self, kind: str, arg: Any, deadline: float) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        with self._state:
            self._calls.put(_Handoff(kind, arg, deadline, future))
            if self.closed and self._serving == 0:  # a late call to an evicted version still runs
                self._serve_in_thread(None)
        return future

    def close(self) -> None:
        """Stop the workers once the calls queued so far are done."""
        self.closed = True
        for _ in range(self.size):
            self._calls.put(None)

    def _next(self) -> _Handoff | None:
        """The next queued call; None once the lane is closed and nothing is queued."""
        while True:
            try:
                handoff = self._calls.get(timeout=CLOSED_IDLE_S if self.closed else None)
            except Empty:
                handoff = None
            if handoff is not None:
                return handoff
            if self.closed:
                with self._state:
                    if self._calls.empty():
                        self._serving -= 1
                        return None

    def _take(self, pending: deque[_Handoff]) -> list[_Handoff] | None:
        """The next calls to send (None: closed); with one worker, every call queued."""
        while not pending:
            handoff = self._next()
            if handoff is None:
                return None
            pending.append(handoff)
        if self.size == 1:
            while len(pending) < MAX_MESSAGE_CALLS:
                try:
                    handoff = self._calls.get_nowait()
                except Empty:
                    break
                if handoff is not None:  # None: a wake-up from close(), seen by _next later
                    pending.append(handoff)
        now = time.monotonic()
        batch = []
        while pending and (self.size == 1 or not batch):
            handoff = pending.popleft()
            if not handoff.future.cancelled() and now < handoff.deadline:
                batch.append(handoff)
        return batch

    def _serve(self, worker: Worker | None) -> None:
        pending: deque[_Handoff] = deque()
        try:
            while True:
                batch = self._take(pending)
                if batch is None:
                    return
                if not batch:
                    continue
                if worker is None:
                    try:
                        worker = Worker(*self._spawn_args)
                    except Exception as exc:  # noqa: BLE001 - every call waiting gets the load error
                        for handoff in batch:
                            handoff.value = exc
                            self._answer(handoff)
                        continue
                    self.pids.append(worker.proc.pid)
                if not self._exchange(worker, batch, pending):
                    worker = None  # killed or dead: the next calls start a new one
        finally:
            if worker is not None:
                worker.stop()

    def _exchange(self, worker: Worker, batch: list[_Handoff], pending: deque[_Handoff]) -> bool:
        """Send `batch`, answer each call as it comes; False if the worker is gone."""
        try:
            worker.send.send(("call", [(h.kind, h.arg, h.deadline) for h in batch]))
        except (OSError, ValueError) as exc:  # broken pipe, or the call's data does not pickle
            if isinstance(exc, OSError):
                pending.extendleft(reversed(batch))  # nothing was sent: all of it goes to a new worker
                worker.kill()
                return False
            for handoff in batch:
                handoff.value = exc
                self._answer(handoff)
            return True
        index, last, deadline = 0, 0, batch[0].deadline  # `last`: the last call the running one holds
        while index < len(batch):
            handoff = batch[index]
            if index > last:
                last, deadline = index, handoff.deadline
            try:
                if not worker.recv.poll(max(deadline - time.monotonic(), 0.0)
                                        if deadline != float("inf") else None):
                    worker.kill()
                    error: Exception = CallTimeout(
                        f"{self.label} did not answer within its time limit; its worker process "
                        'was stopped and replaced. Send a larger "timeout_seconds" or a smaller batch'
                    )
                else:
                    answer = worker.recv.recv()
                    if answer[0] == "group":  # the next call holds this request and those after it
                        last = index + answer[1] - 1
                        # Stopped only once every caller it holds has given up.
                        deadline = max(h.deadline for h in batch[index:last + 1])
                        continue
                    if answer[0] == "done":
                        handoff.ok, handoff.value = answer[1], answer[2]
                        if not handoff.ok:
                            handoff.value = RuntimeError(handoff.value)
                        self._answer(handoff)
                    index += 1  # "expired": its caller's own timer answers it
                    continue
            except (EOFError, OSError):
                death = worker.death()
                log.error("%s: %s while running a call; starting a new one", self.label, death)
                worker.kill()
                held = ("a micro-batch that held this request (a failed micro-batch fails every "
                        "request it held)" if last > index else "this call")
                error = WorkerCrashed(
                    f"{self.label} crashed: {death} while running {held}; the other calls "
                    "queued for it are unaffected. Fix the deployment, or send other inputs"
                )
            # The worker is gone: the running call fails, with every request it held, and the
            # calls behind them, which never started, go to the next worker.
            for failed in batch[index:last + 1]:
                failed.value = error
                self._answer(failed)
            pending.extendleft(reversed(batch[last + 1:]))
            return False
        return True
