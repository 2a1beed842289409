"""`framework keys create|list|revoke`: API keys (the first one turns keys on)."""

from __future__ import annotations

import click

from framework.cli.common import config_option, load_config, note, print_table


@click.group("keys", no_args_is_help=False)
def keys() -> None:
    """Create, list or revoke API keys (the first one turns keys on)."""


@keys.command("create")
@click.option("--deployments", metavar="A,B", help="only these deployments, comma-separated",
              show_default="every deployment")
@click.option("--note", "note_", default="", metavar="TEXT", help="who or what the key is for")
@config_option
def create(deployments: str | None, note_: str) -> int:
    """Print a new key (shown once; the store keeps its hash)."""
    from framework.serve import auth

    store = load_config().open_store()
    limited = [d.strip() for d in deployments.split(",") if d.strip()] if deployments else None
    key_id, key = auth.create_key(store, deployments=limited, note=note_)
    click.echo(key)
    note(f"created API key {key_id} for {', '.join(limited) if limited else 'every deployment'}; "
         "it is shown only this once: store it now")
    return 0


@keys.command("list")
@config_option
def list_() -> int:
    """Every key: id, deployments, status (never the key itself)."""
    from framework.serve import auth

    rows = [[k["id"], k["created_at"], ", ".join(k["deployments"] or ["*"]),
             "revoked " + k["revoked_at"] if k["revoked_at"] else "active", k["note"] or None]
            for k in auth.list_keys(load_config().open_store())]
    if rows:
        print_table(rows, ["ID", "CREATED", "DEPLOYMENTS", "STATUS", "NOTE"])
    else:
        click.echo("no API keys: calls need none; `framework keys create` turns keys on")
    return 0


@keys.command("revoke")
@click.argument("key_id", metavar="KEY_ID")
@config_option
def revoke(key_id: str) -> int:
    """Revoke a key, by its id (from `keys list`) or the key itself.

    A running server refuses it within a second.
    """
    from framework.serve import auth

    note(f"revoked API key {auth.revoke_key(load_config().open_store(), key_id)}")
    return 0
