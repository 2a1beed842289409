"""Serve the benchmark's doubler with BentoML, MLflow and Ray Serve, and load each.

    python bench/peers/run.py [--peers ours,bentoml,mlflow,ray] [--seconds 3]

Each peer gets a virtual environment of its own under bench/peers/.venvs/
(created on first use, with the pinned version below; needs network access
then), so none of them touches the framework's environment. The cases are
those of bench/run.py's table for one server: single-row requests/s at 16
connections, rows/s in 1,000- and 10,000-row batches, RSS after load, and
the time from spawn to the first answer. `ours` is `framework serve` in its
default mode, measured in the same run, so each peer's single-row figure has
ours beside it as a ratio. Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any, Callable

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import functions  # noqa: E402 - bench/ is on the path only from here
import load  # noqa: E402
import servers  # noqa: E402

import framework  # noqa: E402

PINS = {
    "bentoml": ["bentoml>=1.4,<1.5"],
    "mlflow": ["mlflow>=3,<4"],
    "ray": ["ray[serve]>=2,<3"],
}
PATH = "/v1/doubler/latest"


def rows(n: int) -> list[list[int]]:
    return [[i, 10] for i in range(n)]


def env_for(peer: str) -> Path:
    """The peer's virtual environment's bin directory, created and installed once."""
    root = HERE / ".venvs" / peer
    bin_dir = root / "bin"
    if not (bin_dir / "python").exists():
        venv.create(root, with_pip=True)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "orjson", *PINS[peer]],
                       check=True)
    return bin_dir


def start(peer: str, port: int, tmp: Path) -> tuple[servers.Server, str, Callable[[Any], Any]]:
    """The running server, the path to POST to, and how to wrap rows into a body."""
    if peer == "ours":  # the framework's own environment, as bench/run.py serves it
        framework.deploy(functions.doubler, store=str(tmp / "store"))
        probe = orjson.dumps({"data": rows(1)})
        return servers.ours(port, tmp / "store", PATH, probe), PATH, lambda data: {"data": data}
    bin_dir = env_for(peer)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp), "HOME": str(tmp)}
    if peer == "bentoml":
        argv = [str(bin_dir / "bentoml"), "serve", "bentoml_service:Doubler", "--port", str(port)]
        path, wrap = PATH, lambda data: {"data": data}
    elif peer == "ray":
        env["RAY_SERVE_HTTP_PORT"] = str(port)
        argv = [str(bin_dir / "serve"), "run", "ray_service:app", "--route-prefix", PATH]
        path, wrap = PATH, lambda data: {"data": data}
    else:
        model = tmp / "mlflow-model"
        subprocess.run([str(bin_dir / "python"), "mlflow_model.py", str(model)], cwd=HERE, check=True)
        argv = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local",
                "--port", str(port)]
        path, wrap = "/invocations", lambda data: {"inputs": data}
    probe = orjson.dumps(wrap(rows(1)))
    return servers.Server(peer, argv, env=env, cwd=HERE, probe=path, body=probe, port=port), path, wrap


def one_pass(peer: str, seconds: float, into: dict[str, list[float]]) -> None:
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer}-") as tmp:
        server, path, wrap = start(peer, servers.free_port(), Path(tmp))
        try:
            into.setdefault("start", []).append(server.started_s)
            for key, n, conns in (("single", 1, 16), ("b1k", 1000, 4), ("b10k", 10000, 4)):
                result = load.run(server.url(path), orjson.dumps(wrap(rows(n))), connections=conns,
                                  seconds=seconds)
                into.setdefault(key, []).append(result.rps * (n if n > 1 else 1))
            into.setdefault("rss", []).append(server.rss_mb())
        finally:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default="ours,bentoml,mlflow,ray")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    peers = args.peers.split(",")
    got: dict[str, dict[str, list[float]]] = {peer: {} for peer in peers}
    for n in range(args.passes):  # the peers in turns, the order reversed every other pass
        for peer in peers[:: 1 if n % 2 == 0 else -1]:
            one_pass(peer, args.seconds, got[peer])
    print("| server | single-row req/s (16 conns) | ours / this, single-row | rows/s, 1,000-row "
          "| rows/s, 10,000-row | RSS after load, MB | start to first answer, s |\n"
          "|---|---|---|---|---|---|---|")
    for peer in peers:
        m = {k: statistics.median(v) for k, v in got[peer].items()}
        ratio = ""
        if "ours" in got and peer != "ours":  # the median of the passes' ratios
            ratio = f"{statistics.median(a / b for a, b in zip(got['ours']['single'], got[peer]['single'])):.1f}x"
        print(f"| {peer} | {m['single']:,.0f} | {ratio} | {m['b1k']:,.0f} | {m['b10k']:,.0f} "
              f"| {m['rss']:.0f} | {m['start']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
