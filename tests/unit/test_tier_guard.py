"""The unit tier stays in-process: conftest refuses processes and network in tests/unit."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys

import pytest


def test_starting_a_process_fails_the_test_naming_the_other_tier():
    with pytest.raises(AssertionError, match="started a process: it belongs in tests/integration"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    with pytest.raises(AssertionError, match="started a process"):
        multiprocessing.get_context("spawn").Process(target=print).start()


def test_git_alone_may_run_as_a_deploy_reads_its_metadata():
    out = subprocess.run(["git", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("git version")


def test_the_network_is_refused_and_local_sockets_are_not():
    with socket.socket() as s, pytest.raises(AssertionError, match="used the network"):
        s.connect(("127.0.0.1", 9))
    with socket.socket() as s, pytest.raises(AssertionError, match="used the network"):
        s.bind(("127.0.0.1", 0))
    left, right = socket.socketpair()  # what an event loop uses to wake itself
    with left, right:
        left.sendall(b"x")
        assert right.recv(1) == b"x"
