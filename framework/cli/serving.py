"""`framework serve` (the HTTP server) and `framework batch` (offline scoring)."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace
from typing import Any

import click

from framework import config as cfgmod
from framework.batch.command import options as batch_options
from framework.cli.common import config_option, load_config, note
from framework.errors import ConfigError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _port(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 65535:
        raise click.BadParameter(f"{value} is not a TCP port: give a number from 1 to 65535")
    return value


def _workers(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"{value}: give a number of worker processes, at least 1")
    return value


def _root_path(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (not value.startswith("/") or value.endswith("/") or "//" in value):
        raise click.BadParameter(
            f"{value!r}: give the prefix the proxy strips, starting with '/' and without a "
            "trailing '/', e.g. /ml")
    return value


def _check_port(host: str, port: int) -> None:
    """Fail with the fix in the message, before loading anything, when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; stop the other server or pass "
                "--port N (or set server.port in deploy.yaml)"
            ) from None


@click.command("serve")
@click.option("--host", metavar="HOST", help="address to listen on",
              show_default="server.host in deploy.yaml, else 127.0.0.1")
@click.option("--port", type=int, callback=_port, metavar="PORT", help="TCP port, 1-65535",
              show_default="server.port in deploy.yaml, else 8000")
@click.option("--workers", type=int, callback=_workers, metavar="N", help="server processes",
              show_default="server.workers in deploy.yaml, else 1")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", help="uvicorn's log level")
@click.option("--root-path", callback=_root_path, metavar="PATH",
              help="the path prefix a reverse proxy strips before forwarding (e.g. /ml): links "
                   "and the key check see the app as mounted there", show_default="none")
@config_option
def serve(host: str | None, port: int | None, workers: int | None, log_level: str,
          root_path: str | None) -> int:
    """Serve the store over HTTP (Modelbit's REST protocol)."""
    import uvicorn

    from framework.serve.server import HTTPProtocol

    cfg = load_config()
    s = cfg.server
    host, port, workers = host or s["host"], port or s["port"], workers or s["workers"]
    if not 1 <= port <= 65535:
        raise ConfigError(f"{cfg.path or cfgmod.CONFIG_NAME}: server.port: {port} is not a TCP port; "
                          "give a number from 1 to 65535")
    _check_port(host, port)
    note(f"serving store {cfg.store} on http://{host}:{port} ({workers} worker(s))")
    common: dict[str, Any] = dict(host=host, port=port, log_level=log_level, http=HTTPProtocol,
                                  access_log=False,  # ours replaces uvicorn's lines, on or off
                                  root_path=root_path or "")
    if workers == 1:
        from framework.serve.app import serving_app

        uvicorn.run(serving_app(cfg), **common)
    else:
        # Each worker process builds its own app from the same settings.
        if cfg.path:
            os.environ["FRAMEWORK_CONFIG"] = str(cfg.path)
        os.environ["FRAMEWORK_STORE"] = cfg.store
        uvicorn.run("framework.serve.app:app_from_env", factory=True, workers=workers, **common)
    return 0


@click.command("batch")
@batch_options
@config_option
def batch(**options: Any) -> int:
    """Score a table (Parquet or CSV) offline with one pinned version.

    NAME[@REF] is the deployment, and a version, latest (default) or an alias.
    """
    from framework.batch.command import run

    options["map"] = list(options["map"])
    return run(SimpleNamespace(**options), load_config())
