"""A worker process as the server sees it: started and loaded (`Worker`), then its
pipes read and written on the event loop (`Pipes`).

The messages are framed as `multiprocessing.connection` frames them (the
worker reads and writes with a `Connection`): a 4-byte big-endian length, or
-1 and an 8-byte one past 2 GiB, then the pickle. Reading them here, on the
loop, instead of on a thread per worker, means an isolated call's answer
wakes the loop once and takes no thread switch or GIL handoff in the server.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import struct
import subprocess
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, BinaryIO

import cloudpickle

from framework.errors import IncompatibleArtifact, IntegrityError, LoadFailed

log = logging.getLogger("framework.runtime")

READ_LIMIT = 1 << 22  # what the reader buffers before it pauses the pipe
ONE_WRITE = 16384  # frames up to this size go out with their header in one write
STOP_GRACE_S = 2.0


class _Writes(asyncio.Protocol):
    """The write side's protocol: nothing to do but be told the pipe broke."""


class Pipes:
    """One worker's two pipes, owned by the event loop once `open`ed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.WriteTransport,
                 read_transport: asyncio.ReadTransport) -> None:
        self._reader = reader
        self._writer = writer
        self._read_transport = read_transport

    @classmethod
    async def open(cls, to_child: BinaryIO, from_child: BinaryIO) -> Pipes:
        """Hand both files to the running loop, which closes them with `close`."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                         from_child)
        writer, _ = await loop.connect_write_pipe(_Writes, to_child)
        return cls(reader, writer, read_transport)

    def send(self, message: Any) -> bool:
        """Queue `message` for the worker; False if the pipe is already broken (nothing
        reached it). Raises what pickling raises, before anything is written."""
        data = ForkingPickler.dumps(message)
        size = len(data)
        head = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        if self._writer.is_closing():
            return False
        if size <= ONE_WRITE:
            self._writer.write(head + bytes(data))
        else:
            self._writer.writelines((head, data))
        return not self._writer.is_closing()

    async def receive(self) -> Any:
        """The next message; EOFError (`asyncio.IncompleteReadError`) once the worker is gone."""
        head = await self._reader.readexactly(4)
        (size,) = struct.unpack("!i", head)
        if size == -1:
            (size,) = struct.unpack("!Q", await self._reader.readexactly(8))
        return ForkingPickler.loads(await self._reader.readexactly(size))

    def close(self) -> None:
        """Close both pipes (the worker reads EOF); what is still buffered for it is dropped."""
        self._writer.abort()
        self._read_transport.close()


def detach(fd: int, mode: str) -> BinaryIO:
    """A file of its own over a copy of `fd`, for a loop transport to own and close."""
    return open(os.dup(fd), mode, buffering=0)  # noqa: SIM115 - closed by the transport


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

    def pipes(self) -> tuple[BinaryIO, BinaryIO]:
        """(to the child, from the child) as files for the event loop to own; the
        `Connection`s the load used are closed."""
        files = (detach(self.send.fileno(), "wb"), detach(self.recv.fileno(), "rb"))
        self._close_pipes()
        return files

    def reap(self, grace: float = STOP_GRACE_S) -> None:
        """Wait up to `grace` s for the process to end, then kill it (its pipes are the loop's)."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _close_pipes(self) -> None:
        for conn in (self.send, self.recv):
            try:
                conn.close()
            except OSError:
                pass
