"""`mailcore init`, `user …`, `apikey …` and `token …`: the installation, users and credentials.

A new key or token is printed alone on stdout (one line, nothing else) so that scripts can
capture it: `KEY=$(mailcore apikey create alice)`. It is shown once and never stored.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import sys
from typing import Any

from mailcore.cli import CommandError, command_group, print_table
from mailcore.identity import PLANS, User


def register(subparsers: Any) -> None:
    """Add init, user, apikey and token to the `mailcore` command line."""
    init = subparsers.add_parser(
        "init", help="create the data directory and the database schema",
        description="Create the data directory, migrate the database to the newest schema "
        "and make the self-signed TLS pair if none is configured; prints where they are.",
    )
    init.set_defaults(handler=init_command)

    users = command_group(subparsers, "user", help="add, list and change users")
    add = users.add_parser(
        "add", help="create a user",
        description="Create a user. Without --password the password is read from stdin: "
        "one line from a pipe, or a prompt on a terminal.",
    )
    add.add_argument("name", help="user name (letters, digits and @.+-_)")
    add.add_argument("--email", required=True, help="the user's email address")
    add.add_argument("--password", help="the password [default: read from stdin]")
    add.add_argument("--plan", choices=PLANS, default="free", help="plan [default: free]")
    add.set_defaults(handler=user_add, prepare=read_password)

    listing = users.add_parser("list", help="list users")
    listing.set_defaults(handler=user_list)

    set_plan = users.add_parser("set-plan", help="change a user's plan")
    set_plan.add_argument("name", help="user name or email")
    set_plan.add_argument("plan", choices=PLANS)
    set_plan.set_defaults(handler=user_set_plan)

    set_password = users.add_parser(
        "set-password", help="change a user's password",
        description="Change a user's password; what the old one handed out ends with it: "
        "the user's browser sessions (the OAuth pages), the tokens of its password logins "
        "(/api-token-auth/, /api/v1/auth/) and its OAuth access and refresh tokens "
        "(Dropmyemail apps must be allowed again). API keys (and the safedrop sessions "
        "made with them) and the tokens `token create` printed stay: revoke them with "
        "`apikey revoke` and `token revoke`. Without --password the password is read from "
        "stdin.",
    )
    set_password.add_argument("name", help="user name or email")
    set_password.add_argument("--password", help="the password [default: read from stdin]")
    set_password.set_defaults(handler=user_set_password, prepare=read_password)

    disable = users.add_parser(
        "disable", help="disable a user: every login, key, token and grant stops working",
        description="Disable a user: password logins, API keys, tokens, safedrop and page "
        "sessions and OAuth access tokens of the user are refused (a running daemon, which "
        "believes a secret it resolved for one second, refuses them within that second); "
        "its remote mailboxes are no longer synced, its webhook deliveries wait, and its "
        "migrate and restore jobs wait queued (one running is paused within its next batch "
        "and goes on where it stood once the user is enabled); the outbox mail of its "
        "Mail API mailboxes stays in the outbox, in its order, sent once it is enabled; no "
        "quarantine digest goes out for its domains (the held mail is in the first one once "
        "it is enabled) and release links of earlier digests release nothing until then; "
        "mail to its domains is refused with 450 4.2.1 on every node within "
        "about a second, a temporary refusal: the senders keep it and try again, and it "
        "arrives once the user is enabled (within their retry time, commonly 4-5 days; "
        "mail already accepted is still delivered); its safedrop links open nothing (403, "
        "\"for now\") until it is enabled. "
        "Nothing is deleted: `user enable` undoes it.",
    )
    disable.add_argument("name", help="user name or email")
    disable.set_defaults(handler=user_set_active, active=False)
    enable = users.add_parser(
        "enable", help="enable a disabled user again",
        description="Enable a disabled user again (not one being deleted: finish that "
        "with `user delete`).",
    )
    enable.add_argument("name", help="user name or email")
    enable.set_defaults(handler=user_set_active, active=True)

    remove = users.add_parser(
        "delete", help="delete a user and everything it owns (asks for --yes)",
        description="Delete a user and everything it owns, for good: its domains (their "
        "address lists and quarantined mail), its Mail API mailboxes with their mail, "
        "drafts and unsent outbox mail and the grants it gave on them, the grants it holds "
        "on other users' mailboxes, its fetch accounts with their backed-up messages and "
        "their migrate and restore jobs, its safedrop drops with their files on disk, its "
        "webhooks with their pending deliveries, its OAuth apps and the grants it gave "
        "apps, its API keys, tokens and sessions, and its token tanks. Its invoices are "
        "kept (accounting records), no longer linked to any user. Mail already accepted "
        "for its domains is bounced to the senders at its next delivery attempt. The user "
        "is disabled first, so nothing of it runs meanwhile on any node; a deletion cut "
        "short (a crash) leaves it disabled and marked, and running this again finishes "
        "it. Without --yes it only says what would be deleted.",
    )
    remove.add_argument("name", help="user name or email")
    remove.add_argument("--yes", action="store_true",
                        help="really delete (without it, nothing is changed)")
    remove.set_defaults(handler=user_delete)

    keys = command_group(subparsers, "apikey", help="create, list and revoke API keys")
    _credential_create(
        keys, "apikey", help="create an API key and print it (alone, once)",
        description="Create an API key for the user and print it alone on stdout. It is "
        "shown only now: the database keeps a digest.",
        label="a note saying what the key is for",
    )

    key_list = keys.add_parser("list", help="list a user's API keys (never the secrets)")
    key_list.add_argument("name", help="user name or email")
    key_list.set_defaults(handler=credential_list, kind="apikey")

    revoke = keys.add_parser("revoke", help="revoke an API key by its prefix")
    revoke.add_argument("name", help="user name or email")
    revoke.add_argument("prefix", help="the key's prefix, as `apikey list` shows it")
    revoke.set_defaults(handler=credential_revoke, kind="apikey")

    tokens = command_group(subparsers, "token", help="create, list and revoke API tokens")
    _credential_create(
        tokens, "token", help="create a token and print it (alone, once)",
        description="Create a non-expiring token (IMAP2API `Token`, Mail API `auth_key`) "
        "and print it alone on stdout.",
        label="a note saying what it is for",
    )
    token_list = tokens.add_parser(
        "list", help="list a user's tokens (never the secrets)",
        description="List a user's tokens: those `token create` printed and those the "
        "password logins handed out (/api-token-auth/, /api/v1/auth/), by prefix and label.",
    )
    token_list.add_argument("name", help="user name or email")
    token_list.set_defaults(handler=credential_list, kind="token")
    token_revoke = tokens.add_parser("revoke", help="revoke a token by its prefix")
    token_revoke.add_argument("name", help="user name or email")
    token_revoke.add_argument("prefix", help="the token's prefix, as `token list` shows it")
    token_revoke.set_defaults(handler=credential_revoke, kind="token")


def _credential_create(actions: Any, kind: str, help: str, description: str, label: str) -> None:
    """Add `create NAME [--label L]`: a new credential of `kind` for the user, printed alone."""
    create = actions.add_parser("create", help=help, description=description)
    create.add_argument("name", help="user name or email")
    create.add_argument("--label", default="", help=label)
    create.set_defaults(handler=credential_create, kind=kind)


# -- helpers ------------------------------------------------------------------------------


def read_password(args: argparse.Namespace) -> None:
    """Fill args.password from stdin when not given: a line from a pipe, or a prompt.

    Runs before the reactor starts, so blocking on the terminal is fine.
    """
    if args.password is not None:
        return
    stdin = sys.stdin
    if stdin is None:
        raise CommandError("no password: give --password or pipe it on stdin")
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != first:
            raise CommandError("the passwords do not match")
        args.password = first
        return
    line = stdin.readline()
    if not line:
        raise CommandError("no password on stdin: give --password or pipe one line")
    args.password = line.rstrip("\r\n")


async def require_user(core: Any, name: str) -> User:
    """The user named `name` (user name or email), else a CommandError."""
    user: User | None = await core.identity.find_user(name)
    if user is None:
        raise CommandError(f"no such user: {name}")
    return user


def when(value: datetime.datetime | None) -> str:
    """A UTC time to the minute, or "-"."""
    if value is None:
        return "-"
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M")


# -- handlers -----------------------------------------------------------------------------


async def init_command(args: argparse.Namespace, core: Any) -> int:
    config = core.config
    print(f"data directory: {config.data_dir.resolve()}")
    print(f"database: {core.db.engine.url.render_as_string(hide_password=True)}")
    if core.tls_cert is not None:
        print(f"TLS certificate: {core.tls_cert.resolve()}")
    return 0


async def user_add(args: argparse.Namespace, core: Any) -> int:
    user: User = await core.identity.create_user(
        args.name, args.email, args.password, plan=args.plan
    )
    print(f"created user {user.username} <{user.email}> (plan {user.plan})")
    return 0


async def user_list(args: argparse.Namespace, core: Any) -> int:
    found: list[User] = await core.identity.list_users()
    print_table(
        ("USERNAME", "EMAIL", "PLAN", "ACTIVE", "CREATED"),
        [(u.username, u.email, u.plan,
          "deleting" if u.deleting_at else "yes" if u.is_active else "no", when(u.created_at))
         for u in found],
    )
    return 0


async def user_set_plan(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    await core.identity.set_plan(user.id, args.plan)
    print(f"{user.username}: plan {args.plan}")
    return 0


async def user_set_password(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    await core.identity.set_password(user.id, args.password)
    print(f"{user.username}: password changed")
    return 0


async def user_set_active(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    await core.identity.set_active(user.id, args.active)
    print(f"{user.username}: {'enabled' if args.active else 'disabled'}")
    return 0


async def user_delete(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    holdings = await core.deletion.holdings(user)
    if not args.yes:
        held = holdings.summary()
        what = f"it and {held}" if held else "it (it owns no domain, mailbox, account, drop, " \
            "webhook or app)"
        raise CommandError(f"deleting {user.username} removes {what}, for good; "
                           "add --yes to delete")
    if user.deleting_at is not None:
        print(f"{user.username}: finishing the deletion begun {when(user.deleting_at)}")
    removed = await core.deletion.delete(user)
    for name in removed.domains:
        print(f"removed domain {name}")
    for address in removed.mailboxes:
        print(f"removed mailbox {address}")
    if removed.unsent:
        print(f"{removed.unsent} outbox {'mail' if removed.unsent == 1 else 'mails'} "
              "went unsent")
    print(f"deleted user {user.username}")
    return 0


async def credential_create(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    secret, _info = await core.identity.create_credential(user.id, args.kind, label=args.label)
    print(secret)
    return 0


# What `list` and `revoke` call each kind of credential.
_KIND_NAMES = {"apikey": "API key", "token": "token"}


async def credential_list(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    found = await core.identity.list_credentials(user.id, args.kind)
    print_table(
        ("PREFIX", "LABEL", "CREATED", "LAST USED", "REVOKED"),
        [
            (c.prefix, c.label or "-", when(c.created_at), when(c.last_used_at),
             "yes" if c.revoked else "no")
            for c in found
        ],
    )
    return 0


async def credential_revoke(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.name)
    count: int = await core.identity.revoke_credential(user.id, args.prefix, args.kind)
    name = _KIND_NAMES[args.kind]
    if count == 0:
        raise CommandError(f"no live {name} of {user.username} has the prefix {args.prefix}")
    print(f"revoked {count} {name}{'s' if count > 1 else ''} of {user.username}")
    return 0
