"""What every command shares: the --config option, the loaded config, and output.

Tables are rich tables on a terminal and plain aligned columns otherwise, so
scripts (and `awk`) keep reading the same text they always did.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

import click

from framework import config as cfgmod

F = TypeVar("F", bound=Callable[..., Any])
_CONFIG = "framework.config"  # key in click's shared ctx.meta
CONFIG_HELP = "path to deploy.yaml"
CONFIG_DEFAULT = "$FRAMEWORK_CONFIG, else ./deploy.yaml"


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # Given after the command it overrides the one given before: the last word wins.
    if value is not None:
        ctx.meta[_CONFIG] = value


def config_option(f: F) -> F:
    """`--config PATH`, accepted before the command (the group's) and after it (each command's)."""
    return click.option("--config", metavar="PATH", expose_value=False,
                        callback=_remember_config, help=CONFIG_HELP,
                        show_default=CONFIG_DEFAULT)(f)


def load_config() -> cfgmod.Config:
    """The configuration named by --config, $FRAMEWORK_CONFIG or ./deploy.yaml."""
    return cfgmod.load(click.get_current_context().meta.get(_CONFIG))


def branch_option(default: str = "deploy.yaml's branch, else main") -> Callable[[F], F]:
    return click.option("--branch", metavar="BRANCH", help="the branch to read",
                        show_default=default)


def json_option(what: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True,
                        help=f"print {what} as one JSON document (see docs/cli.md)")


def fancy() -> bool:
    """Whether stdout is a terminal a person reads (rich output) rather than a pipe."""
    return sys.stdout.isatty()


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plain_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    """A table on stdout: rich on a terminal, plain columns (header first) otherwise."""
    if not fancy():
        click.echo(plain_table(rows, header))
        return
    from rich.box import SIMPLE_HEAD
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*header, box=SIMPLE_HEAD, header_style="bold")
    for r in rows:  # Text, so a "[...]" in a note or a name is never read as rich markup
        table.add_row(*(Text("-" if c is None else str(c)) for c in r))
    Console().print(table)


def print_json(doc: Any) -> None:
    """One JSON document on stdout, keys sorted so diffs and tests stay stable."""
    import orjson

    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
                     + "\n")


def note(text: str) -> None:
    """A line for the person at the terminal, on stderr so stdout stays parseable."""
    click.echo(text, err=True)
