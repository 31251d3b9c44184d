"""`mailcore secrets …`: change the fetch key, or give up what a lost one encrypted.

The fetch key (`fetch.key` in the data directory, or `[fetch] secret_key`) encrypts remote
mailbox passwords, migrate and restore destination passwords, webhook signing secrets and
safedrop secure messages (mailcore.fetch.rekey). Stop the daemon before either command.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import CommandError, command_group
from mailcore.fetch import rekey
from mailcore.fetch.secrets import SecretError

ROTATE_HELP = (
    "Encrypt every stored secret again with a new key. With the key file (fetch.key) a new "
    "key is made and, once every secret is under it, is the only one left in the file; "
    "copy the file to the other nodes sharing the database. With [fetch] secret_key, put "
    "the new key first in the setting (keys separated by commas), run this, then remove "
    "the old keys. Safe to run again after a crash. Stop the daemon first."
)
FORGET_HELP = (
    "For a fetch key lost for good: give up every stored secret no current key opens, so "
    "that the daemon starts again. Those remote mailbox and migrate/restore passwords and "
    "webhook secrets must then be set again (their syncs, jobs and deliveries fail saying "
    "so), and those safedrop secure messages are gone. A missing key file is made anew; "
    "what the current key opens is kept. Stop the daemon first."
)


def register(subparsers: Any) -> None:
    """Add `secrets` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "secrets", help="rotate the fetch key, or give up a lost one's secrets",
        description="The fetch key (fetch.key in the data directory, or [fetch] secret_key) "
        "encrypts remote mailbox and migrate/restore passwords, webhook signing secrets and "
        "safedrop secure messages.",
    )
    rotate = actions.add_parser("rotate", help="encrypt every stored secret with a new key",
                                description=ROTATE_HELP)
    rotate.set_defaults(handler=secrets_rotate)
    forget = actions.add_parser(
        "forget", help="give up the stored secrets a lost key encrypted",
        description=FORGET_HELP)
    forget.add_argument("--yes", action="store_true",
                        help="really give them up (without it, nothing is changed)")
    forget.set_defaults(handler=secrets_forget)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} in {name}" for name, n in sorted(counts.items())) or "none"


async def secrets_rotate(args: argparse.Namespace, core: Any) -> int:
    try:
        done = await rekey.rotate(core.db, core.cpu, core.config.data_dir,
                                  core.fetch.settings.secret_key)
    except SecretError as e:
        raise CommandError(str(e)) from None
    if done.unreadable:
        raise CommandError(
            f"no key opens {_counts(done.unreadable)}; they were left as they are, and so "
            f"were the old keys (encrypted again: {_counts(done.rotated)}): restore the key "
            f"they were encrypted with, or give them up with `mailcore secrets forget --yes`")
    print(f"encrypted again: {_counts(done.rotated)}")
    if core.fetch.settings.secret_key:
        print("every secret is under the first key of [fetch] secret_key: the others can go")
    else:
        print(f"{core.config.data_dir / rekey.KEY_FILE} holds the new key alone: copy it to "
              f"the other nodes sharing this database, and keep it with the backups")
    return 0


async def secrets_forget(args: argparse.Namespace, core: Any) -> int:
    if not args.yes:
        raise CommandError("this gives up stored secrets for good: run it again with --yes")
    try:
        done = await rekey.forget(core.db, core.cpu, core.config.data_dir,
                                  core.fetch.settings.secret_key)
    except SecretError as e:
        raise CommandError(str(e)) from None
    print(f"given up: {_counts(done.forgotten)}")
    return 0
