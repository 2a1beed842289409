"""The `framework` command line, on Click.

Exit codes: 0 success (an all-unchanged deploy included); 2 bad configuration
or usage; 3 a deployment could not be packaged; 4 the store could not be read
or written (or is damaged); 5 an unknown deployment, version or alias; 1
anything else; 130 interrupted. Every error is one `error: ...` line saying
what to do, never a traceback.
"""

from __future__ import annotations

import sys

import click

from framework import __version__
from framework.cli import deploying, inspecting, keys, serving
from framework.cli.common import config_option
from framework.errors import (
    ConfigError,
    FrameworkError,
    NotFound,
    PackagingError,
    RegistryError,
    StoreDamaged,
    StoreError,
)

EXIT_CODES: dict[type[FrameworkError], int] = {
    ConfigError: 2,
    RegistryError: 2,
    PackagingError: 3,
    StoreError: 4,
    StoreDamaged: 4,
    NotFound: 5,
}
USAGE, INTERRUPTED = 2, 130

# Every option's help shows its default; options whose default comes from
# deploy.yaml say so in words.
SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


@click.group("framework", context_settings=SETTINGS, no_args_is_help=False)
@click.version_option(__version__, "--version", prog_name="framework",
                      message="%(prog)s %(version)s", help="print the version and exit")
@config_option
def cli() -> None:
    """Turn plain Python functions into versioned REST inference endpoints.

    --config works before the command and after it.
    """


for command in (deploying.deploy, serving.serve, *inspecting.COMMANDS, keys.keys,
                deploying.build, serving.batch):
    cli.add_command(command)


def _usage(exc: click.UsageError) -> str:
    """Click's message as one line that says where the usage is explained."""
    where = exc.ctx.command_path if exc.ctx is not None else "framework"
    message = exc.format_message().rstrip(".")
    return f"error: {message[:1].lower()}{message[1:]}; see `{where} --help`"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]) and return its exit code."""
    try:
        code = cli.main(args=argv, prog_name="framework", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.UsageError as exc:
        print(_usage(exc), file=sys.stderr)
        return USAGE
    except click.ClickException as exc:  # e.g. a file option that cannot be opened
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except FrameworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
    except OSError as exc:  # the file system refused something none of the checks foresaw
        print(f"error: {exc.strerror or exc}"
              f"{f': {exc.filename}' if exc.filename else ''}; check the path and its permissions",
              file=sys.stderr)
        return 4
    except (click.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
