"""Execution over a real server: at most once, no stalls, thread safety, process isolation."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import orjson
import pytest

from conftest import Server, run_cli
from framework import config, protocol

MODULE = '''
import ctypes
import os
import sqlite3
import time
import urllib.request

import numpy as np

from framework import deployment

LOG = os.environ["EXEC_TEST_LOG"]


@deployment
def counted(x):
    """One line per call; a few inputs are slow, as real traffic has."""
    if x % 20 == 7:
        time.sleep(0.05)
    with open(LOG, "a") as f:
        f.write(f"{x}\\n")
    return x


@deployment
def fast(x):
    return x + 1


@deployment
def fetch(url):
    """Blocks in a library call, as a model calling a slow service does."""
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


@deployment
def query(seconds):
    con = sqlite3.connect(":memory:")
    con.create_function("pause", 1, time.sleep)
    con.execute("select pause(?)", (seconds,)).fetchall()
    return seconds


SCRATCH = np.zeros(64)


@deployment
def scratch_model(x):
    """Not thread-safe: a shared buffer, as many model objects have."""
    SCRATCH[:] = x
    time.sleep(0)
    total = float(SCRATCH.sum())
    return total / 64


@deployment(isolation="process")
def isolated(x):
    if x == "exit":
        os._exit(3)
    if x == "segfault":
        ctypes.string_at(0)
    if isinstance(x, (int, float)) and x < 0:
        time.sleep(-x)
    return [x, os.getpid()]


@deployment(isolation="process", vectorized=True)
def isolated_vector(x):
    return [2 * v for v in x]


def _gathered(x):
    """Waits for the test's gate (60 s at most) on a row of -1; exits on 999, raises on 998;
    logs each call's rows."""
    if -1 in x:
        for _ in range(6000):
            if os.path.exists(LOG + ".gate"):
                break
            time.sleep(0.01)
    if 999 in x:
        os._exit(3)
    if 998 in x:
        raise ValueError(f"998 among {len(x)} rows")
    with open(LOG + ".vec", "a") as f:
        f.write(" ".join(map(str, x)) + "\\n")
    return [[2 * v, len(x)] for v in x]


# One function in both modes: a worker's and a thread's raw bodies are gathered alike.
gathered = deployment(name="gathered", isolation="process", vectorized=True, max_batch_rows=8)(_gathered)
gathered_thread = deployment(name="gathered_thread", vectorized=True, max_batch_rows=8)(_gathered)


@deployment(isolation="process")
def isolated_adder(a, b, c=100):
    return a + b + c


def _echo(x, y=0):
    if x == "bad":
        raise ValueError(f"bad input {y}")
    return x if y == 0 else [x, y]


# One function in both modes: what a caller gets must not depend on where it ran.
echo_process = deployment(name="echo_process", isolation="process")(_echo)
echo_thread = deployment(name="echo_thread")(_echo)


def _vector_echo(x, y=0):
    if "bad" in x:
        raise ValueError(f"bad input among {len(x)}")
    return [v if w == 0 else [v, w] for v, w in zip(x, y)]


vector_process = deployment(name="vector_process", isolation="process", vectorized=True)(_vector_echo)
vector_thread = deployment(name="vector_thread", vectorized=True)(_vector_echo)
# With a wait, the event loop parses the rows and gathers the calls: the third way, and the first.
vector_waits = deployment(name="vector_waits", vectorized=True, max_wait_ms=1)(_vector_echo)


async def _echo_async(x, y=0):
    return _echo(x, y)


echo_async_process = deployment(name="echo_async_process", isolation="process")(_echo_async)
echo_async_thread = deployment(name="echo_async_thread")(_echo_async)

_arrived = {}


async def _together(token, n):
    """A batch's rows wait for each other (5 s at most): together only if they run at once."""
    import asyncio

    _arrived[token] = _arrived.get(token, 0) + 1
    for _ in range(500):
        if _arrived[token] >= n:
            return "together"
        await asyncio.sleep(0.01)
    return "alone"


together_process = deployment(name="together_process", isolation="process")(_together)
together_thread = deployment(name="together_thread")(_together)

_first = None


async def _remembers(x):
    """Keeps a future made on its first call's loop: later calls await it on theirs."""
    import asyncio

    global _first
    if _first is None:
        _first = asyncio.get_running_loop().create_future()
        _first.set_result(x)
    return [await _first, x]


remembers_process = deployment(name="remembers_process", isolation="process")(_remembers)
remembers_thread = deployment(name="remembers_thread")(_remembers)
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("exec")
    (project / "mod.py").write_text(textwrap.dedent(MODULE))
    (project / "deploy.yaml").write_text("modules: [mod]\nserver: {max_concurrency: 100}\n")
    log = project / "calls.log"
    run_cli("deploy", store=project / "store", cwd=project, EXEC_TEST_LOG=str(log))
    return project


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[Server]:
    srv = Server(project / "store", cwd=project, EXEC_TEST_LOG=str(project / "calls.log"))
    yield srv
    srv.stop()


def test_each_call_runs_exactly_once_under_load_with_slow_inputs(server: Server, project: Path) -> None:
    log = project / "calls.log"
    for i in range(20):  # it looks cheap first
        assert server.post("/v1/counted/latest", {"data": 1000 + i}).status_code == 200
    log.write_text("")
    singles = list(range(400))
    batches = [[[j, 10_000 + 10 * b + j] for j in range(10)] for b in range(40)]
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(16) as pool:
        post = lambda body: client.post(f"{server.url}/v1/counted/latest", json=body)  # noqa: E731
        answers = list(pool.map(post, [{"data": x} for x in singles] + [{"data": b} for b in batches]))
    assert all(a.status_code == 200 for a in answers)
    lines = log.read_text().split()
    expected = [str(x) for x in singles] + [str(r[1]) for b in batches for r in b]
    assert sorted(lines) == sorted(expected)  # each exactly once: 800 lines for 800 calls


def test_a_deployment_blocked_in_a_library_call_delays_no_other(server: Server) -> None:
    """A slow HTTP service (a receiver on 127.0.0.1 that answers after a while) and a slow
    sqlite query hold their own threads only: the others, and /livez, keep answering."""
    release = threading.Event()

    import http.server

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            release.wait(30)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"late")

        def log_message(self, *args: object) -> None:
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    try:
        with ThreadPoolExecutor(2) as pool:
            blocked = pool.submit(server.post, "/v1/fetch/latest",
                                  {"data": f"http://127.0.0.1:{slow.server_port}/"})
            querying = pool.submit(server.post, "/v1/query/latest", {"data": 3})
            time.sleep(0.3)
            for i in range(30):
                assert server.post("/v1/fast/latest", {"data": i}).json() == {"data": i + 1}
                assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
            assert not blocked.done()  # all of that happened while it was blocked
            release.set()
            assert blocked.result().json() == {"data": "late"}
            assert querying.result().json() == {"data": 3}
    finally:
        release.set()
        slow.shutdown()


def test_a_model_that_is_not_thread_safe_gives_no_wrong_answer(server: Server) -> None:
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda x: client.post(f"{server.url}/v1/scratch_model/latest", json={"data": x}).json(),
            range(1600)))
    wrong = [(x, a) for x, a in enumerate(answers) if a != {"data": float(x)}]
    assert wrong == []


def test_an_isolated_deployment_runs_in_a_worker_process(server: Server) -> None:
    value, pid = server.post("/v1/isolated/latest", {"data": 5}).json()["data"]
    assert value == 5 and pid != server.proc.pid
    batch = server.post("/v1/isolated/latest", {"data": [[2, "b"], [1, "a"]]}).json()
    assert batch == {"data": [[1, ["a", pid]], [2, ["b", pid]]]}
    assert server.post("/v1/isolated_adder/latest", {"data": [[1, 1, 2], [2, {"a": 1, "b": 2}]]}
                       ).json() == {"data": [[1, 103], [2, 103]]}
    assert server.post("/v1/isolated_adder/latest", {"data": [1, 2, 3]}).json() == {"data": 6}
    vector = server.post("/v1/isolated_vector/latest", {"data": [[i, i] for i in range(50)]})
    assert vector.json() == {"data": [[i, 2 * i] for i in range(50)]}


def _nice(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])  # the 19th field of proc(5)


def test_workers_run_nicer_than_the_server_unless_told_not_to(server: Server, short_server: Server) -> None:
    if _nice(server.proc.pid) >= 19:
        pytest.skip("the tests run at nice 19 already: no worker can be nicer than the server")
    _, pid = server.post("/v1/isolated/latest", {"data": 1}).json()["data"]
    assert _nice(pid) == min(19, _nice(server.proc.pid) + config.SERVER_DEFAULTS["worker_nice"])
    deadline = time.monotonic() + 60  # loading counts against the short server's 6 s limit
    while (first := short_server.post("/v1/isolated/latest", {"data": 1})).status_code != 200:
        assert first.status_code == 504 and time.monotonic() < deadline, first.text
    _, pid = first.json()["data"]
    assert _nice(pid) == _nice(short_server.proc.pid)


@pytest.mark.parametrize("crash, cause", [("exit", "exited with code 3"),
                                          ("segfault", "killed by SIGSEGV")])
def test_a_crashing_worker_fails_only_its_call_and_is_replaced(
        server: Server, crash: str, cause: str) -> None:
    _, before = server.post("/v1/isolated/latest", {"data": 1}).json()["data"]
    with ThreadPoolExecutor(8) as pool:
        bystanders = [pool.submit(server.post, "/v1/isolated/latest", {"data": i}) for i in range(3)]
        crashed = server.post("/v1/isolated/latest", {"data": crash})
        bystanders += [pool.submit(server.post, "/v1/isolated/latest", {"data": i}) for i in range(3, 6)]
        answers = [f.result() for f in bystanders]
    assert crashed.status_code == 422, crashed.text
    assert cause in crashed.json()["error"] and "crashed" in crashed.json()["error"]
    assert [a.json()["data"][0] for a in answers] == list(range(6))
    _, after = server.post("/v1/isolated/latest", {"data": 2}).json()["data"]
    assert after != before
    assert server.proc.poll() is None


def _pipes_and_children(pid: int) -> tuple[int, list[int]]:
    """The pipes the server holds open and its child processes, zombies included."""
    fds = Path(f"/proc/{pid}/fd")
    pipes = 0
    for fd in fds.iterdir():
        try:
            pipes += os.readlink(fd).startswith("pipe:")
        except FileNotFoundError:  # closed meanwhile
            pass
    children = sorted(int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                      for c in (task / "children").read_text().split())
    return pipes, children


def test_a_worker_replaced_again_and_again_leaves_no_pipe_or_process_behind(server: Server) -> None:
    # The pipes to a worker belong to the event loop: each replaced worker's must be closed,
    # and the process reaped, or a crash-looping deployment would run the server out of both.
    server.post("/v1/isolated/latest", {"data": 1})
    pipes, children = _pipes_and_children(server.proc.pid)
    for crash in ["exit", "segfault", -30, "exit", -30]:
        body = {"data": crash, "timeout_seconds": 0.5} if crash == -30 else {"data": crash}
        assert server.post("/v1/isolated/latest", body).status_code in (422, 504)
        assert server.post("/v1/isolated/latest", {"data": 2}).status_code == 200
    after_pipes, after_children = _pipes_and_children(server.proc.pid)
    assert after_pipes == pipes
    assert len(after_children) == len(children)
    for child in after_children:
        assert Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_call_past_its_limit_kills_its_worker_and_what_queued_behind_runs(server: Server) -> None:
    _, before = server.post("/v1/isolated/latest", {"data": 1}).json()["data"]
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(server.post, "/v1/isolated/latest", {"data": -30, "timeout_seconds": 1})
        time.sleep(0.3)
        behind = [pool.submit(server.post, "/v1/isolated/latest", {"data": i}) for i in range(3)]
        answer = slow.result()
        queued = [f.result() for f in behind]
    assert answer.status_code == 504, answer.text
    assert [q.json()["data"][0] for q in queued] == [0, 1, 2]
    assert all(q.json()["data"][1] != before for q in queued)  # run on the new worker
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)


# Bodies with no options, which the worker parses itself, and a few with options, which the
# server parses: each must get the same answer from both modes.
# Rows enough for a body over protocol.LARGE_BODY, in reverse order.
BIG_ROWS = [[i, i % 97] for i in range(100_000, 0, -1)]
SAME_ANSWER_BODIES = [
    b'{"data": 5}',
    b'{"data": [[1, "a"], [3, 5, 6], [2, {"x": 1, "y": 2}]]}',
    b'{"data": [["b", 1], [2, 2], ["a", 3], [1.5, 4]]}',  # mixed ids: numbers first
    b'{"data": [[1, "bad"], [2, 2], [3, "bad", 7]]}',  # errors per row
    b'{"data": [[1, "bad"], [2, 2]], "partial": true}',
    b'{"data": [[1, "bad"], [2, 2]], "\\u0070artial": true}',  # an escaped option name
    b'{"data": "bad"}',
    b'{"data": [[1, 1], [1, 2]]}',  # a repeated id
    b'{"data": [[1, 1], [], [3, 3]], "batch": true}',
    b'{"data": [[true, 1]], "batch": true}',
    b'{"data": [[1, 123456789012345678901234567890]]}',  # beyond 64 bits
    b'{"data": [[1, 1]}',  # not JSON
    b'[1, 2]',
    b'{"rows": [[1, 1]]}',
    b'{"data": [[1, 1], [2, 2]], "timeout_seconds": 10}',
    b'{"data": [[1, ' + b'"' + b"x" * 300_000 + b'"' + b']]}',  # a huge row
    b'{"data": [' + b",".join(b"[%d, %d]" % (i, i) for i in range(2000)) + b"]}",
    # Over a megabyte, with what the server must read past the first one.
    orjson.dumps({"data": BIG_ROWS}),
    orjson.dumps({"data": BIG_ROWS + [[0, "bad"]], "partial": True}),
    orjson.dumps({"data": BIG_ROWS + [[0, "bad"]]}),
    orjson.dumps({"data": BIG_ROWS, "timeout_seconds": 30}),
    orjson.dumps({"data": BIG_ROWS + [[5, 5]]}),  # a repeated id
]


def test_a_body_parsed_in_the_worker_answers_as_on_a_thread(server: Server) -> None:
    for kind in ("echo", "echo_async", "vector"):
        for body in SAME_ANSWER_BODIES:
            process = server.post(f"/v1/{kind}_process/latest", body)
            thread = server.post(f"/v1/{kind}_thread/latest", body)
            assert (process.status_code, process.json()) == (thread.status_code, thread.json()), \
                (kind, body[:80])
            assert process.headers["content-type"] == "application/json"
            if kind == "vector":
                waits = server.post("/v1/vector_waits/latest", body)
                assert (waits.status_code, waits.json()) == (thread.status_code, thread.json()), body[:80]


def test_an_async_deployment_runs_in_a_worker_as_on_the_event_loop(server: Server) -> None:
    """A batch's rows run at once, each once, and the loop lasts from call to call."""
    for mode in ("process", "thread"):
        rows = [[i, f"{mode}-1", 20] for i in range(20)]
        answer = server.post(f"/v1/together_{mode}/latest", {"data": rows})
        assert answer.json() == {"data": [[i, "together"] for i in range(20)]}, mode
        assert server.post(f"/v1/remembers_{mode}/latest", {"data": 1}).json() == {"data": [1, 1]}
        assert server.post(f"/v1/remembers_{mode}/latest", {"data": 2}).json() == {"data": [1, 2]}, mode


def test_an_option_past_the_first_megabyte_of_a_body_is_still_read_by_the_server(server: Server) -> None:
    """A body with no option goes to the worker raw, whatever its size; one naming an option
    anywhere is read by the server, which serves this one by a link."""
    body = orjson.dumps({"data": BIG_ROWS, "response_format": "links"})
    assert body.index(b'"response_format"') > protocol.LARGE_BODY
    # Loaded first: only a loaded version's requests are sent to its worker raw.
    assert server.post("/v1/echo_process/latest", {"data": [[1, 1]]}).status_code == 200
    resp = server.post("/v1/echo_process/latest", body)
    assert resp.status_code == 200, resp.text[:300]
    url = resp.json()["data"]
    assert url.startswith(server.url + "/v1/echo_process/links/")
    fetched = httpx.get(url, timeout=60)
    assert fetched.json() == {"data": [[i, i % 97] for i in range(1, 100_001)]}


def _rows_counted(server: Server, name: str) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    counted = [0.0, 0.0]
    for line in text.splitlines():
        for n, metric in enumerate(("framework_rows_total{", "framework_row_errors_total{")):
            if line.startswith(metric) and f'deployment="{name}"' in line:
                counted[n] += float(line.rsplit(" ", 1)[1])
    return counted[0], counted[1]


def test_rows_and_row_errors_of_a_body_parsed_in_the_worker_are_counted(server: Server) -> None:
    rows, errors = _rows_counted(server, "echo_process")
    body = {"data": [[1, 1], [2, "bad"], [3, 3]], "partial": False}
    plain = b'{"data": [[1, 1], [2, "bad"], [3, 3], [4, 4]]}'
    assert server.post("/v1/echo_process/latest", plain).status_code == 422
    assert server.post("/v1/echo_process/latest", b'{"data": [[1, 1], [2, 2]]}').status_code == 200
    assert server.post("/v1/echo_process/latest", body).status_code == 422

    def counted() -> bool:
        return _rows_counted(server, "echo_process") == (rows + 9, errors + 2)

    deadline = time.monotonic() + 30
    while not counted() and time.monotonic() < deadline:  # counted within 50 ms of the answer
        time.sleep(0.05)
    assert _rows_counted(server, "echo_process") == (rows + 9, errors + 2)


@pytest.fixture(scope="module")
def short_server(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same store, with a server time limit of 6 s, at most 100 rows a request, and
    workers as nice as the server."""
    config = tmp_path_factory.mktemp("short") / "deploy.yaml"
    config.write_text("server: {timeout_seconds: 6, max_rows: 100, worker_nice: 0}\n")
    srv = Server(project / "store", cwd=project, EXEC_TEST_LOG=str(project / "calls.log"),
                 FRAMEWORK_CONFIG=str(config))
    yield srv
    srv.stop()


def test_a_plain_body_past_the_server_limit_kills_its_worker_and_what_queued_runs(
        short_server: Server) -> None:
    # Loading counts against the same limit: on a busy machine, the first tries may time out.
    deadline = time.monotonic() + 60
    while (first := short_server.post("/v1/isolated/latest", b'{"data": 1}')).status_code != 200:
        assert first.status_code == 504 and time.monotonic() < deadline, first.text
    _, before = first.json()["data"]
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(short_server.post, "/v1/isolated/latest", b'{"data": [[1, -30]]}')
        # Those queued behind it share its limit: sent 4 s later, they leave the new worker
        # 4 s to start and answer them once the slow call is stopped.
        time.sleep(4)
        behind = [pool.submit(short_server.post, "/v1/isolated/latest", b'{"data": [[7, %d]]}' % i)
                  for i in range(3)]
        answer = slow.result()
        queued = [f.result() for f in behind]
    assert answer.status_code == 504, answer.text
    assert [q.json()["data"][0][1][0] for q in queued] == [0, 1, 2]
    assert all(q.json()["data"][0][1][1] != before for q in queued)  # run on the new worker
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)


def test_a_plain_body_over_the_row_limit_answers_413_in_both_modes(short_server: Server) -> None:
    for name in ("echo_process", "echo_thread"):
        path = f"/v1/{name}/latest"
        too_many = b'{"data": [' + b",".join(b"[%d, 1]" % i for i in range(101)) + b"]}"
        answer = short_server.post(path, too_many)  # refused before the version is loaded
        assert answer.status_code == 413 and "server.max_rows" in answer.json()["error"], name
        assert short_server.post(path, too_many.replace(b",[100, 1]", b"")).status_code == 200


def _in_flight(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("framework_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no framework_requests_in_flight in /metrics")


def _behind_a_gate(server: Server, project: Path, values: list[int],
                   name: str = "gathered") -> tuple[httpx.Response, list[httpx.Response]]:
    """Single-row requests of `values` to `name`, sent while its call waits at a gate: they
    reach its worker in one message, or its thread together."""
    log, gate = project / "calls.log.vec", project / "calls.log.gate"
    gate.unlink(missing_ok=True)
    path = f"/v1/{name}/latest"
    assert server.post(path, {"data": [[0, 0]]}).status_code == 200  # loaded
    log.write_text("")
    with ThreadPoolExecutor(len(values) + 1) as pool:
        first = pool.submit(server.post, path, {"data": [[0, -1]]})
        deadline = time.monotonic() + 60
        while _in_flight(server) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        behind = [pool.submit(server.post, path, b'{"data": [[%d, %d]]}' % (v, v)) for v in values]
        while _in_flight(server) < len(values) + 1:  # every one queued for the worker
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gate.write_text("")
        return first.result(), [f.result() for f in behind]


def _calls(project: Path) -> list[list[int]]:
    """The rows of each call `_gathered` logged."""
    return [list(map(int, line.split())) for line in (project / "calls.log.vec").read_text().splitlines()]


@pytest.mark.parametrize("name", ["gathered", "gathered_thread"])
def test_a_vectorized_version_gathers_the_raw_bodies_queued_for_it(
        server: Server, project: Path, name: str) -> None:
    values = list(range(1, 13))
    first, answers = _behind_a_gate(server, project, values, name)
    assert first.json() == {"data": [[0, [-2, 1]]]}
    assert [a.json()["data"][0][0] for a in answers] == values
    assert all(a.json()["data"][0][1][0] == 2 * v for a, v in zip(answers, values))
    calls = _calls(project)
    assert sorted(v for call in calls for v in call) == [-1, *values]  # each row once
    sizes = sorted(len(call) for call in calls[1:])
    assert sizes == [4, 8]  # twelve single-row requests, up to max_batch_rows=8 a call
    assert sorted(a.json()["data"][0][1][1] for a in answers) == [4] * 4 + [8] * 8


def test_a_failed_call_gathered_on_a_thread_fails_the_requests_it_held_and_no_other(
        server: Server, project: Path) -> None:
    values = [1, 2, 3, 998, 5, 6, 7, 8, 9, 10, 11, 12]
    _, answers = _behind_a_gate(server, project, values, "gathered_thread")
    ok = [v for v, a in zip(values, answers) if a.status_code == 200]
    failed = [a for a in answers if a.status_code != 200]
    assert 998 not in ok and len(failed) in (8, 4)  # in the call of 8 or in the call of 4
    for answer in failed:
        assert answer.status_code == 422 and "ValueError: 998 among" in answer.json()["error"]
    ran = [v for call in _calls(project) for v in call]
    assert sorted(ran) == sorted([-1, *ok])  # what failed never ran again; the rest ran once
    assert all(a.json()["data"][0][1][1] == len(ok) for a in answers if a.status_code == 200)


def test_a_raw_body_that_times_out_queued_on_a_gathering_thread_never_runs(
        short_server: Server, project: Path) -> None:
    log, gate = project / "calls.log.vec", project / "calls.log.gate"
    gate.unlink(missing_ok=True)
    path = "/v1/gathered_thread/latest"
    deadline = time.monotonic() + 60  # loading counts against the 6 s limit: retried
    while (loaded := short_server.post(path, b'{"data": [[0, 0]]}')).status_code != 200:
        assert loaded.status_code == 504 and time.monotonic() < deadline, loaded.text
    log.write_text("")
    with ThreadPoolExecutor(4) as pool:
        stuck = pool.submit(short_server.post, path, b'{"data": [[0, -1]]}')
        while _in_flight(short_server) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        behind = [pool.submit(short_server.post, path, b'{"data": [[%d, %d]]}' % (v, v)) for v in (1, 2, 3)]
        answers = [stuck.result(), *(f.result() for f in behind)]
    assert [a.status_code for a in answers] == [504] * 4, [a.text for a in answers]
    gate.write_text("")
    while _calls(project) != [[-1]]:  # the stuck call runs on to its end; its answer is dropped
        assert time.monotonic() < deadline + 60
        time.sleep(0.02)
    assert short_server.post(path, b'{"data": [[4, 4]]}').json() == {"data": [[4, [8, 1]]]}
    assert _calls(project) == [[-1], [4]]  # 1, 2 and 3 timed out queued: never run


def test_a_crash_in_a_gathered_call_fails_the_requests_it_held_and_no_other(
        server: Server, project: Path) -> None:
    values = [1, 2, 3, 999, 5, 6, 7, 8, 9, 10, 11, 12]
    _, answers = _behind_a_gate(server, project, values)
    ok = [v for v, a in zip(values, answers) if a.status_code == 200]
    failed = [(v, a) for v, a in zip(values, answers) if a.status_code != 200]
    # The requests arrive in any order, so 999 is in the call of 8 or in the call of 4.
    assert 999 in [v for v, _ in failed] and len(failed) in (8, 4)
    for _, answer in failed:
        assert answer.status_code == 422 and "crashed" in answer.json()["error"]
        assert "micro-batch" in answer.json()["error"] and "exited with code 3" in answer.json()["error"]
    ran = [v for call in _calls(project) for v in call]
    assert sorted(ran) == sorted([-1, *ok])  # what failed never ran again; the rest ran once
    assert len(ok) == 12 - len(failed)
    assert all(a.json()["data"][0][1][1] == len(ok) for v, a in zip(values, answers) if v in ok)  # one call
    assert server.post("/v1/gathered/latest", {"data": [[1, 21]]}).json() == {"data": [[1, [42, 1]]]}
