"""Side-by-side benchmark: two bare Starlette apps against `framework serve`.

    python bench/run.py                  # the full run; writes bench/RESULTS.md
    python bench/run.py --quick          # one short pass, to check the harness works
    python bench/run.py --only process   # only the cases of one target, printed, not written

Three servers serve the same doubler: *bare-inline* (bench/bare_app.py, the
function called on the event loop), *bare-safe* (the same endpoint with the
work in Starlette's thread pool) and ours, which serves it in each of its
execution modes (its own thread by default, `inline=True`, and
`isolation="process"`). In each pass the servers run side by side, over
loopback with bounded load, and every case is measured on each server that
has it one right after the other, in an order that reverses every other pass.
The tables show per case the median over passes, and the median of the
passes' ratios. docs/performance.md says what each row means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

import functions
import load
import models
import servers

import framework
from framework.build.packing import pack
from framework.store import open_store

SINGLE = b'{"data": [[1, 10]]}'
CALL = b'{"data": 10}'
MLP_ROW = b'{"data": [[1, 5.1, 3.5, 1.4, 0.2]]}'
BAD_ROW = b'{"data": [[1, 5.1, "x", 1.4, 0.2]]}'  # the model cannot turn "x" into a float
SPIN = b'{"data": 100000}'  # a few ms of pure Python per call
BARES = ("bare-inline", "bare-safe")
PACED_RATE = 1000  # requests/s of the latency probe beside a CPU-bound deployment


def batch(rows: int, features: int = 1) -> bytes:
    args = [10] if features == 1 else [5.1, 3.5, 1.4, 0.2]
    return orjson.dumps({"data": [[i, *args] for i in range(rows)]})


# (key, label, body, connections, rows per request: 0 means report requests/s)
THROUGHPUT = [
    ("single", "single-row batch `[[1, 10]]`, 16 connections, req/s", SINGLE, 16, 0),
    ("call", "single call `10`, 16 connections, req/s", CALL, 16, 0),
    ("b1k", "1,000-row batches, 4 connections, rows/s", batch(1000), 4, 1000),
    ("b10k", "10,000-row batches, 4 connections, rows/s", batch(10000), 4, 10000),
]
# Our other execution modes, on the same doubler: (mode key, path, THROUGHPUT keys)
MODES = [
    ("inline", "/v1/doubler_inline/latest", ("single", "call")),
    ("process", "/v1/doubler_process/latest", ("single", "call", "b1k", "b10k")),
]
DOUBLER = "/v1/doubler/latest"
# The cases only ours has, in groups whose cases are measured back to back: each gain's sides.
OURS_ONLY_GROUPS = [
    [("mlp_rows", "/v1/mlp_rows/latest", batch(1000, 4), 4, 1000),
     ("mlp_vec", "/v1/mlp_vectorized/latest", batch(1000, 4), 4, 1000),
     ("mlp_vec_inline", "/v1/mlp_vectorized_inline/latest", batch(1000, 4), 4, 1000)],
    [("mlp_rows_process", "/v1/mlp_rows_process/latest", batch(1000, 4), 4, 1000),
     ("mlp_vec_process", "/v1/mlp_vectorized_process/latest", batch(1000, 4), 4, 1000)],
    [("micro_rows", "/v1/mlp_rows/latest", MLP_ROW, 64, 0),
     ("micro_vec", "/v1/mlp_vectorized/latest", MLP_ROW, 64, 0)],
]
OURS_ONLY = [case for group in OURS_ONLY_GROUPS for case in group]
QUIET = "metrics: false, access_log: false"
# `--only`: the cases one target compares, as (server, path, case key, THROUGHPUT or
# OURS_ONLY key), and the ratios shown: (label, (server, key), (server, key), target).
ONLY = {
    "process": ([("ours", DOUBLER, "single", "single"), ("ours", DOUBLER, "b1k", "b1k"),
                 ("ours", DOUBLER, "b10k", "b10k"),
                 ("ours", "/v1/doubler_process/latest", "single_process", "single"),
                 ("ours", "/v1/doubler_process/latest", "b1k_process", "b1k"),
                 ("ours", "/v1/doubler_process/latest", "b10k_process", "b10k")],
                [("process / default, single-row req/s", ("ours", "single_process"), ("ours", "single"), 0.5),
                 ("process / default, 1,000-row rows/s", ("ours", "b1k_process"), ("ours", "b1k"), 0.8),
                 ("process / default, 10,000-row rows/s", ("ours", "b10k_process"), ("ours", "b10k"),
                  None)]),
    "inline": ([("bare-inline", DOUBLER, "single", "single"), ("bare-inline", DOUBLER, "call", "call"),
                ("ours", "/v1/doubler_inline/latest", "single_inline", "single"),
                ("ours", "/v1/doubler_inline/latest", "call_inline", "call")],
               [("inline / bare-inline, single-row req/s", ("ours", "single_inline"),
                 ("bare-inline", "single"), 0.9),
                ("inline / bare-inline, single call req/s", ("ours", "call_inline"),
                 ("bare-inline", "call"), None)]),
    "mlp": ([("ours", "", "mlp_rows", "mlp_rows"), ("ours", "", "mlp_vec", "mlp_vec"),
             ("ours", "", "mlp_vec_inline", "mlp_vec_inline"), ("ours", "", "mlp_rows_process", "mlp_rows_process"),
             ("ours", "", "mlp_vec_process", "mlp_vec_process")],
            [("vectorized / row by row, numpy MLP rows/s", ("ours", "mlp_vec"), ("ours", "mlp_rows"),
              10.0),
             ("vectorized inline=True / row by row, numpy MLP rows/s", ("ours", "mlp_vec_inline"),
              ("ours", "mlp_rows"), None),
             ('both isolation="process", vectorized / row by row, numpy MLP rows/s',
              ("ours", "mlp_vec_process"), ("ours", "mlp_rows_process"), None)]),
}

Results = dict[str, list[float]]


def measure(server: servers.Server, path: str, body: bytes, conns: int, rows: int,
            seconds: float, into: Results, key: str, threads: int = 2) -> None:
    status, answer = servers.post(server.port, path, body)
    if status != 200:
        raise RuntimeError(f"{server.label} {path} answered {status}: {answer[:300]!r}")
    cpu = cpu_seconds(server)
    result = load.run(server.url(path), body, connections=conns, seconds=seconds, threads=threads)
    cpu = cpu_seconds(server) - cpu
    if result.errors:
        raise RuntimeError(f"{server.label} {path}: {result.errors} failed requests under load")
    into.setdefault(key, []).append(result.rps * (rows or 1))
    # CPU time of the server and its worker processes per request (per row for batches), in
    # microseconds: it moves far less with the machine's other load than a rate does.
    into.setdefault(key + "_cpu", []).append(cpu / (result.rps * (rows or 1) * seconds) * 1e6)
    into.setdefault(key + "_p50", []).append(result.p50_ms)
    into.setdefault(key + "_p99", []).append(result.p99_ms)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # the thread or process has just ended
        return ""


def cpu_seconds(server: servers.Server) -> float:
    """User and system CPU time used so far by the server and its worker processes."""
    total = 0
    pid = server.proc.pid
    # Every thread's children: the worker processes are started from threads of the server.
    children = [int(c) for task in Path(f"/proc/{pid}/task").glob("*")
                for c in _read(task / "children").split()]
    for pid in [pid, *children]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: the 14th and 15th fields
    return total / os.sysconf("SC_CLK_TCK")


def beside(server: servers.Server, seconds: float, into: Results, tmp: Path) -> None:
    """The doubler's latency at a fixed rate: alone, then while a second client keeps a
    CPU-bound deployment busy, in a worker process and on a thread of the server.

    Two rounds, the second in the reverse order, and each case's p99 over both rounds'
    latencies: a p99 of about a millisecond moves with a few scheduling delays, and
    twice the samples, taken minutes apart at most, move it less."""
    cases = [("alone", None), ("spin_process", "/v1/spin_process/latest"),
             ("spin_thread", "/v1/spin_thread/latest")]
    url = server.url(DOUBLER)
    latencies: dict[str, list[float]] = {key: [] for key, _ in cases}
    rates: dict[str, list[float]] = {key: [] for key, _ in cases}
    for round_cases in (cases, cases[::-1]):
        for key, other in round_cases:
            hammer = None
            if other is not None:
                # Two connections: one call always waits while the other runs.
                hammer = load.Hammer(server.url(other), SPIN, connections=2, seconds=seconds + 1, tmp=tmp)
            try:
                result = load.paced(url, SINGLE, rate=PACED_RATE, seconds=seconds, keep=latencies[key])
            except BaseException:
                if hammer is not None:
                    hammer.stop()
                raise
            spun = hammer.result() if hammer is not None else None
            if result.errors or (spun is not None and spun.errors):
                raise RuntimeError(f"{server.label}: failed requests beside {other}")
            if spun is not None:
                rates[key].append(spun.rps)
    for key, _ in cases:
        pooled = load.summary(latencies[key], 2 * seconds, 0)
        into.setdefault(f"{key}_p50", []).append(pooled.p50_ms)
        into.setdefault(f"{key}_p99", []).append(pooled.p99_ms)
        if rates[key]:
            into.setdefault(f"{key}_rps", []).append(statistics.median(rates[key]))


def bad_row(server: servers.Server, clients: int = 64) -> tuple[int, int, int]:
    """`clients` concurrent single-row requests to the micro-batched model, one of them
    with a bad row: how many of the others answered 200 with their own result and how
    many 422 (they shared its call), and the bad one's status."""
    path = "/v1/mlp_vectorized/latest"
    alone = orjson.loads(servers.post(server.port, path, MLP_ROW)[1])["data"][0][1]
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda body: servers.post(server.port, path, body),
                                [BAD_ROW] + [MLP_ROW] * (clients - 1)))
    # Within float32 rounding: BLAS may sum a row's products in another order in a larger call.
    good = sum(status == 200 and abs(orjson.loads(body)["data"][0][1] - alone) < 1e-5
               for status, body in answers[1:])
    failed = sum(status == 422 for status, _ in answers[1:])
    return good, failed, answers[0][0]


def doubler_store(store_dir: Path) -> Path:
    """The store that holds the doubler alone, beside `store_dir`."""
    return store_dir.parent / "doubler-store"


def make_store(root: Path, versions: int) -> Path:
    """A store with `versions` versions of the doubler, and the other functions once; and
    `doubler_store` with the same versions of the doubler only, for the server measured
    against the bare apps, which serve nothing else either (its memory, its start)."""
    store_dir = root / "store"
    package = pack(functions.doubler, branch="main", roots=[servers.BENCH])
    for where in (store_dir, doubler_store(store_dir)):
        store = open_store(str(where))
        for _ in range(versions):
            store.publish("main", "doubler", package.artifact, package.manifest)
    for dep in (functions.doubler_inline, functions.doubler_process, functions.spin_process,
                functions.spin_thread, functions.bumped, models.mlp_rows, models.mlp_vectorized,
                models.mlp_vectorized_inline, models.mlp_rows_process, models.mlp_vectorized_process):
        framework.deploy(dep, store=str(store_dir))
    return store_dir


def deploy_to_served(server: servers.Server, store_dir: Path, step: int) -> float:
    """Seconds from a deploy returning to the server answering with the new version."""
    servers.post(server.port, "/v1/bumped/latest", CALL)  # `latest` is now cached
    framework.deploy(functions.make_bumped(step), name="bumped", store=str(store_dir))
    done = time.perf_counter()
    want = orjson.dumps({"data": 2 * 10 + step})
    for _ in range(2000):  # bounded: 2,000 probes, at most about 10 s
        if servers.post(server.port, "/v1/bumped/latest", CALL)[1] == want:
            return time.perf_counter() - done
        time.sleep(0.005)
    raise RuntimeError("the new version was not served within 10 s")


def start(label: str, store_dir: Path, workers: int = 1, config: Path | None = None) -> servers.Server:
    port = servers.free_port()
    if label in BARES:
        return servers.bare(port, DOUBLER, SINGLE, workers=workers, safe=label == "bare-safe")
    return servers.ours(port, store_dir, DOUBLER, SINGLE, workers=workers, config=config)


def one_pass(n: int, args: argparse.Namespace, store_dir: Path, got: dict[str, Results]) -> None:
    """One pass. The servers run side by side, idle but for the one under load, and each
    case is measured on every server that has it, one right after the other, in an order
    that reverses every other pass: on a shared machine, load moves more over minutes than
    over seconds, and a ratio should not depend on when each side happened to run."""

    def flip(items: list[Any]) -> list[Any]:
        return items if n % 2 == 0 else items[::-1]

    config = store_dir.parent / "quiet.yaml"
    config.write_text(f"server: {{{QUIET}}}\n")
    # "ours" serves a store of the doubler alone, as the bare apps serve nothing else, so
    # its memory and start compare with theirs; "quiet" is the same with the metrics and
    # the access log off; "modes" serves every other mode and case.
    running: dict[str, servers.Server] = {}
    try:
        for label in (*BARES, "ours", "modes", "quiet"):
            running[label] = start(label if label in BARES else "ours",
                                   store_dir if label == "modes" else doubler_store(store_dir),
                                   config=config if label == "quiet" else None)
            if label in (*BARES, "ours"):
                got[label].setdefault("start", []).append(running[label].started_s)

        def run_group(group: list[tuple[str, str, str]], body: bytes, conns: int, rows: int,
                      threads: int = 2) -> None:
            for label, path, key in flip(group):
                into = got[label if label in (*BARES, "ours") else "ours"]
                measure(running[label], path, body, conns, rows, args.seconds, into, key, threads)

        for key, _, body, conns, rows in THROUGHPUT:
            group = [(label, DOUBLER, key) for label in (*BARES, "ours")]
            group += [("modes", path, f"{key}_{mode}") for mode, path, keys in MODES if key in keys]
            if key in ("single", "call"):  # what the metrics and the access log cost
                group.append(("quiet", DOUBLER, f"{key}_quiet"))
            run_group(group, body, conns, rows)
        for label in (*BARES, "ours"):
            got[label].setdefault("rss", []).append(running[label].rss_mb())
        # One wrk thread, as for 2 workers below: with two, wrk alone takes a core of two.
        run_group([(label, DOUBLER, "workers1") for label in (*BARES, "ours")], SINGLE, 16, 0, threads=1)
        for group in OURS_ONLY_GROUPS:
            for key, path, body, conns, rows in flip(group):
                measure(running["modes"], path, body, conns, rows, args.seconds, got["ours"], key)
        ours = got["ours"]
        beside(running["modes"], args.seconds, ours, store_dir.parent)
        ours.setdefault("deploy", []).append(deploy_to_served(running["modes"], store_dir, n + 1))
        good, failed, bad_status = bad_row(running["modes"])
        ours.setdefault("bad_good", []).append(good)
        ours.setdefault("bad_422", []).append(failed)
        ours.setdefault("bad_status", []).append(bad_status)
        # Every version loaded by now, the worker processes of the isolated ones included.
        ours.setdefault("rss_all", []).append(running["modes"].rss_mb())
    finally:
        servers.stop_all(running.values())
    running = {}
    try:
        for label in (*BARES, "ours"):
            running[label] = start(label, doubler_store(store_dir), workers=2)
        for label in flip([*BARES, "ours"]):
            measure(running[label], DOUBLER, SINGLE, 16, 0, args.seconds, got[label], "workers2", threads=1)
    finally:
        servers.stop_all(running.values())


def only_pass(n: int, args: argparse.Namespace, store_dir: Path, got: dict[str, Results]) -> None:
    """One pass over the cases of `args.only`. The servers they need run side by side, and
    the two cases of each ratio are measured one right after the other, in an order that
    alternates by pass: on a shared machine, load moves more over a minute than over seconds."""
    cases = {key: (body, conns, rows) for key, _, body, conns, rows in THROUGHPUT}
    cases.update({key: (body, conns, rows) for key, _, body, conns, rows in OURS_ONLY})
    paths = {key: path for key, path, *_ in OURS_ONLY}
    wanted = {(c[0], c[2]): c for name in args.only for c in ONLY[name][0]}
    order = [pair for name in args.only for _, a, b, _ in ONLY[name][1] for pair in (a, b)]
    order += [key for key in wanted if key not in order]
    running: dict[str, servers.Server] = {}
    try:
        for label in dict.fromkeys(label for label, _ in wanted):
            running[label] = start(label, store_dir)
        for i in range(0, len(order), 2):
            for label, key in order[i:i + 2][:: 1 if n % 2 == 0 else -1]:
                if key in got[label] and len(got[label][key]) > n:
                    continue  # in two ratios: measured once a pass
                _, path, _, case = wanted[(label, key)]
                measure(running[label], path or paths[case], *cases[case], args.seconds, got[label], key)
    finally:
        servers.stop_all(running.values())


def only_table(got: dict[str, Results], only: list[str]) -> str:
    lines = ["| case | server | median | passes | CPU us per request or row, median |",
             "|---|---|---|---|---|"]
    for name in only:
        for label, _, key, _ in ONLY[name][0]:
            values = got[label][key]
            lines.append(f"| {key} | {label} | {num(statistics.median(values))} | "
                         f"{', '.join(num(v) for v in values)} | "
                         f"{statistics.median(got[label][key + '_cpu']):.2f} |")
    lines += ["", "| ratio | median of the passes' | passes | target | CPU per unit, second / first |",
              "|---|---|---|---|---|"]
    for name in only:
        for label, (a, a_key), (b, b_key), target in ONLY[name][1]:
            ratios = [x / y for x, y in zip(got[a][a_key], got[b][b_key])]
            cpu = statistics.median(y / x for x, y in zip(got[a][a_key + "_cpu"], got[b][b_key + "_cpu"]))
            lines.append(f"| {label} | {statistics.median(ratios):.2f} | "
                         f"{', '.join(f'{r:.2f}' for r in ratios)} | "
                         f"{'' if target is None else f'>= {target:g}'} | {cpu:.2f} |")
    return "\n".join(lines)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def mark(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def table(got: dict[str, Results], versions: int) -> str:
    med = {label: {k: statistics.median(v) for k, v in d.items()} for label, d in got.items()}
    bi, bs, o = med["bare-inline"], med["bare-safe"], med["ours"]

    def ratio(a: str, a_key: str, b: str, b_key: str) -> float:
        """The median of the passes' ratios: each pass compares servers measured minutes
        apart at most, which a slow drift of the machine's speed moves less."""
        return statistics.median(x / y for x, y in zip(got[a][a_key], got[b][b_key]))

    def line(*cells: str) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = ["Ours in its default mode (each call on its version's own thread) against both floors.",
             "", line("case", "bare-inline", "bare-safe", "ours", "ours/bare-inline", "ours/bare-safe",
                      "target", "met"), "|---" * 8 + "|"]
    targets = {"single": ("bare-safe", ">= 1.3x bare-safe", lambda r: r >= 1.3),
               "b1k": ("bare-inline", ">= 1.0x bare-inline", lambda r: r >= 1.0),
               "b10k": ("bare-inline", ">= 1.0x bare-inline", lambda r: r >= 1.0)}
    for key, label, *_ in THROUGHPUT:
        ri, rs = ratio("ours", key, "bare-inline", key), ratio("ours", key, "bare-safe", key)
        ref, target, test = targets.get(key, ("", "", None))
        met = None if test is None else test(rs if ref == "bare-safe" else ri)
        lines.append(line(label, num(bi[key]), num(bs[key]), num(o[key]), f"{ri:.2f}", f"{rs:.2f}",
                          target, mark(met)))
    for q in ("p50", "p99"):
        k = f"single_{q}"
        ri, rs = ratio("ours", k, "bare-inline", k), ratio("ours", k, "bare-safe", k)
        target, met = ("<= bare-safe's", rs <= 1.0) if q == "p99" else ("", None)
        lines.append(line(f"{q} latency, single-row batch, 16 connections, ms", num(bi[k]), num(bs[k]),
                          num(o[k]), f"{ri:.2f}", f"{rs:.2f}", target, mark(met)))
    for key, label, target, test in (
        ("rss", "RSS after load, MB", "< 80 MB", lambda v: v < 80),
        ("start", f"start to first answer, s ({versions} versions stored)", "< 0.5 s", lambda v: v < 0.5),
    ):
        lines.append(line(label, num(bi[key]), num(bs[key]), num(o[key]),
                          f"{ratio('ours', key, 'bare-inline', key):.2f}",
                          f"{ratio('ours', key, 'bare-safe', key):.2f}", target, mark(test(o[key]))))
    lines.append(line("deploy finished to new version served, s", "", "", num(o["deploy"]), "", "",
                      "about 1 s", mark(o["deploy"] <= 1.0)))
    lines.append(line("RSS of the server of ours' other modes after its cases (4 in worker processes), MB",
                      "", "", num(o["rss_all"]), "", "", "", ""))

    lines += ["", "Ours in its other modes, and with the metrics and the access log off, against the "
              "reference each is held to.", "",
              line("case", "reference", "reference's", "ours", "ratio", "target", "met"), "|---" * 7 + "|"]
    labels = {key: label for key, label, *_ in THROUGHPUT}
    mode_rows = [
        ("inline", "single", "bare-inline", "single", (0.9, True)),
        ("inline", "call", "bare-inline", "call", None),
        ("inline", "single_p99", "bare-inline", "single_p99", None),
        ("process", "single", "ours", "single", (0.5, True)),
        ("process", "call", "ours", "call", None),
        ("process", "b1k", "ours", "b1k", (0.8, True)),
        ("process", "b10k", "ours", "b10k", None),
        ("process", "single_p99", "ours", "single_p99", None),
        ("quiet", "single", "ours", "single", None),
        ("quiet", "call", "ours", "call", None),
        ("quiet", "single_p99", "ours", "single_p99", None),
    ]
    setting = {"inline": "`inline=True`", "process": '`isolation="process"`', "quiet": f"`{QUIET}`"}
    for mode, key, ref, ref_key, want in mode_rows:
        base, _, q = key.partition("_")
        label = (labels[key] if not q else
                 f"{q} latency, single-row batch, 16 connections, ms")
        ours_key = f"{base}_{mode}" + (f"_{q}" if q else "")
        r = ratio("ours", ours_key, ref, ref_key)
        ref_label = "ours, default" if ref == "ours" else ref
        target = "" if want is None else f">= {want[0]}x {ref_label}"
        lines.append(line(f"{setting[mode]}: {label}", ref_label, num(med[ref][ref_key]),
                          num(o[ours_key]), f"{r:.2f}", target, mark(None if want is None else r >= want[0])))

    lines += ["", f"The doubler (default mode) at a fixed {PACED_RATE:,} req/s, alone and while a second "
              "client keeps a CPU-bound pure-Python deployment busy (2 connections, calls of a few ms).", "",
              line("doubler, single-row batch", "p50, ms", "p99, ms", "p99 / alone", "CPU-bound calls/s",
                   "target", "met"), "|---" * 7 + "|"]
    for key, label in (("alone", "alone"), ("spin_process", 'beside `isolation="process"`'),
                       ("spin_thread", "beside the same on a thread (default mode)")):
        r = ratio("ours", f"{key}_p99", "ours", "alone_p99")
        target, met = ("<= 1.5", r <= 1.5) if key == "spin_process" else ("", None)
        rate = num(o[f"{key}_rps"]) if key != "alone" else ""
        lines.append(line(label, num(o[f"{key}_p50"]), num(o[f"{key}_p99"]),
                          f"{r:.2f}" if key != "alone" else "", rate, target, mark(met)))

    lines += ["", line("ours only", "row by row", "vectorized", "gain", "target", "met"), "|---" * 6 + "|"]
    r = ratio("ours", "mlp_vec", "ours", "mlp_rows")
    lines.append(line("numpy MLP, 1,000-row batches, rows/s", num(o["mlp_rows"]), num(o["mlp_vec"]),
                      f"{r:.1f}x", ">= 10x", mark(r >= 10)))
    r = ratio("ours", "mlp_vec_inline", "ours", "mlp_rows")
    lines.append(line("the same, the vectorized model with `inline=True` (no hop to its thread)",
                      num(o["mlp_rows"]), num(o["mlp_vec_inline"]), f"{r:.1f}x", "", ""))
    r = ratio("ours", "mlp_vec_process", "ours", "mlp_rows_process")
    lines.append(line('the same, both with `isolation="process"` (no GIL shared with the event loop)',
                      num(o["mlp_rows_process"]), num(o["mlp_vec_process"]), f"{r:.1f}x", "", ""))
    r = ratio("ours", "micro_vec", "ours", "micro_rows")
    lines.append(line("numpy MLP, 64 single-row clients, req/s (micro-batched)", num(o["micro_rows"]),
                      num(o["micro_vec"]), f"{r:.2f}x", "a gain (>= 1.1x)", mark(r >= 1.1)))
    def span(values: list[float]) -> str:
        low, high = min(values), max(values)
        return f"{low:.0f}" if low == high else f"{low:.0f} to {high:.0f}"

    passes, statuses = len(got["ours"]["bad_good"]), sorted(set(got["ours"]["bad_status"]))
    lines += ["", f"One bad row among 64 concurrent single-row requests to the micro-batched model "
              f"({plural(passes, 'pass')}): of the 63 others, {span(got['ours']['bad_good'])} "
              f"answered 200 with their own result and {span(got['ours']['bad_422'])} answered 422 "
              f"(a failed micro-batch fails every request it held: running them again would run the "
              f"function twice); the bad one answered {' or '.join(f'{s:.0f}' for s in statuses)}."]
    lines += ["", line("single-row batch, 16 connections, 1 wrk thread, req/s", "1 worker", "2 workers",
                       "gain"), "|---" * 4 + "|"]
    for label, d in (("bare-inline", bi), ("bare-safe", bs), ("ours", o)):
        lines.append(line(label, num(d["workers1"]), num(d["workers2"]),
                          f"{ratio(label, 'workers2', label, 'workers1'):.2f}x"))
    return "\n".join(lines)


OTHERS = "## Other benchmarks"  # where bench/RESULTS.md's part written by hand begins
NOTES = """## How to read it

docs/performance.md says how to run the harness and what each row means; in short:

- Three servers serve the same doubler: *bare-inline* (a bare Starlette app
  calling the function on its event loop, the cheapest design and the unsafe
  one: a slow or blocking call stalls every request), *bare-safe* (the same
  app running the work with `await run_in_threadpool(...)`, Starlette's own
  way for sync code) and ours. Ours' main rows run its default mode, each
  call on its version's own thread, so bare-safe is the fair reference for
  them; `inline=True` (on the event loop) is held to bare-inline.
- wrk and the servers share the machine's cores, so compare ratios within one
  run, not absolute figures across runs. A ratio is the median of the passes'
  ratios. The servers run side by side, each case is measured on all of them
  one right after the other, and that order reverses in every other pass, so
  that a drift in the machine's speed during a run favours none of them.
- All servers run uvicorn with httptools and uvloop (what `uvicorn[standard]`
  adds), with TCP_NODELAY on every connection (`framework/serve/server.py`).
  Ours also sends a response's head and body in one write (`OneWrite`); the
  bare apps keep uvicorn's two, as a hand-written endpoint would.
- `framework serve` tunes CPython's garbage collector (`framework/serve/server.py`):
  what exists once the app is built is frozen, and the youngest objects are
  collected every 10,000 new ones, not 700; the bare apps keep the defaults,
  as a hand-written endpoint would. It shows most on large batches.
- Ours answers a request in one hop to the version's thread, its answer
  encoded there; calls that queue while one runs are taken in turn by the
  same thread and answered in one wake-up of the loop
  (`framework/execute/threads.py`). Starlette's thread pool hands every call to a
  thread and back on its own, through anyio.
- `isolation="process"` sends each request to a warm worker process over a
  pipe as its raw body, which the worker parses, runs and encodes; the
  encoded answer comes back. Calls queued meanwhile travel in one message.
  The server only forwards bytes, so large batches cost about the CPU they
  cost in the server, and their parsing moves to the worker's core.
- Beside a CPU-bound deployment: the doubler is probed at a fixed rate well
  under capacity (`bench/load.py`'s `paced`), in two rounds whose latencies
  are pooled per case (the second round in the reverse order), alone, then while a second
  client (a process of its own) keeps a pure-Python deployment busy, once in
  a worker process and once on a thread of the server, where it holds the
  GIL that the event loop needs. On two cores the worker process still takes
  a core from the server and the load generator; it runs 5 steps nicer than
  the server (`server.worker_nice`), so the server and the clients run first
  when they wake.
- The numpy MLP (`bench/models.py`) costs far more per call than the
  framework does per row, which makes it a fair test of vectorizing. Our
  server runs it with one BLAS thread (`OPENBLAS_NUM_THREADS=1`, set by
  `bench/servers.py`): more gain nothing on its small products and, on two
  busy cores, spinning BLAS threads slowed vectorized calls several fold.
  Its vectorized call runs on the version's thread, as the default mode
  says; with one thread and no wait, that thread also takes the raw bodies
  queued for the version, parses them and gathers their rows into calls, as
  a worker process does; the loop only reads the bodies and writes the
  answers. The `inline=True` line runs the same call on the event loop, only to
  show what the hop to the thread and back costs a model whose numpy calls
  each let go of the GIL and take it again. It is not a way to serve it: a
  call takes about half a millisecond.
  The `isolation="process"` line serves both sides in worker processes,
  whose numpy shares no GIL with the event loop; the rows cross a pipe.
- Micro-batching gathers concurrent single-row requests into one call
  (`max_wait_ms=0`). A failed gathered call fails every request it held:
  running them again one by one would run the function twice for the rows
  that had succeeded, so the bad-row line reports how many of the others
  answered 200 and how many 422, without a target.
- The workers rows use one wrk thread: two workers and a two-thread wrk
  would need four cores. On 2 cores shared with wrk, no server gains much
  from a second worker.
"""


def machine() -> str:
    libs = ", ".join(f"{d} {importlib.metadata.version(d)}"
                     for d in ("starlette", "uvicorn", "httptools", "uvloop", "orjson", "numpy",
                               "cloudpickle"))
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; {libs}; "
            f"load generator: {load.generator()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--passes", type=int, default=3, help="passes per server (the median is shown)")
    p.add_argument("--seconds", type=float, default=3.0, help="load per case and pass, seconds")
    p.add_argument("--versions", type=int, default=200, help="versions stored before start")
    p.add_argument("--quick", action="store_true", help="one 0.3 s pass with the Python generator")
    p.add_argument("--results", help="write the table there (default: bench/RESULTS.md, not with --quick)")
    p.add_argument("--only", action="append", choices=sorted(ONLY),
                   help="only the cases of this target (repeatable); prints, writes nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.passes, args.seconds, args.versions = 1, 0.3, 5
        os.environ["BENCH_NO_WRK"] = "1"  # wrk counts whole seconds only
    results = args.results or (None if args.quick or args.only else str(servers.BENCH / "RESULTS.md"))
    got: dict[str, Results] = {label: {} for label in (*BARES, "ours")}
    with tempfile.TemporaryDirectory(prefix="framework-bench-") as tmp:
        store_dir = make_store(Path(tmp), args.versions)
        for n in range(args.passes):
            print(f"pass {n + 1}/{args.passes} ...", file=sys.stderr, flush=True)
            (only_pass if args.only else one_pass)(n, args, store_dir, got)
    text = only_table(got, args.only) if args.only else table(got, args.versions)
    print(text)
    if results:
        command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        # The other scripts' figures, kept as they are: this run did not measure them.
        old = Path(results).read_text() if Path(results).exists() else ""
        kept = old[old.index(OTHERS):] if OTHERS in old else ""
        Path(results).write_text(
            f"# Benchmark results\n\nLast run: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
            f"`{command.strip()}` ({plural(args.passes, 'pass')} of {args.seconds:g} s per case, "
            f"medians).\n\n"
            f"Machine: {machine()}.\n\n{text}\n\n{NOTES}" + (f"\n{kept}" if kept else "")
        )
        print(f"written to {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
