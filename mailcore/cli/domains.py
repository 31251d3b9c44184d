"""`mailcore domain …` and `mailcore address …`: the served domains and their address lists.

A running daemon sees changes made here within its `[domains] refresh_interval` (30 s by
default), since it answers RCPTs from an in-memory snapshot of these tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from mailcore.cli import CommandError, print_table
from mailcore.cli.users import require_user
from mailcore.domains import Domain, DomainError

Handler = Callable[[argparse.Namespace, Any], Awaitable[int]]


def register(subparsers: Any) -> None:
    """Add `domain` and `address` to the `mailcore` command line."""
    domain = subparsers.add_parser(
        "domain", help="add, list and remove served domains",
        description="The domains this gateway is MX for, and where their mail goes next.",
    )
    actions = domain.add_subparsers(dest="domain_command", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add", help="serve a domain",
        description="Serve a domain: accept its mail and relay it to --redirect-to. The "
        "name may be given in Unicode; it is stored in IDNA form.",
    )
    add.add_argument("name", help="the domain, e.g. example.com")
    add.add_argument("--owner", required=True, help="the owning user (name or email)")
    add.add_argument(
        "--redirect-to", required=True, metavar="HOST[:PORT]",
        help="next hop: host, host:port, [IPv6]:port or [IPv4] (port 25 when absent)",
    )
    add.add_argument("--spam-action", type=int, choices=(0, 1), default=0,
                     help="0: quarantine spam (default), 1: tag it and deliver")
    add.add_argument("--virus-action", type=int, choices=(0, 1), default=0,
                     help="0: quarantine viruses (default), 1: tag them and deliver")
    add.add_argument("--require-tls", action="store_true",
                     help="deliver to the next hop only over verified TLS")
    add.set_defaults(handler=domain_add)

    listing = actions.add_parser("list", help="list served domains")
    listing.add_argument("--owner", help="only this user's domains (name or email)")
    listing.set_defaults(handler=domain_list)

    remove = actions.add_parser("remove", help="stop serving a domain (and drop its list)")
    remove.add_argument("name", help="the domain")
    remove.set_defaults(handler=domain_remove)

    address = subparsers.add_parser(
        "address", help="manage a domain's accepted local parts",
        description="A domain with an address list accepts mail only for the listed local "
        "parts (550 5.1.1 for others); a domain with an empty list accepts every local part.",
    )
    address_actions = address.add_subparsers(
        dest="address_command", metavar="ACTION", required=True
    )
    for name, handler, text in (
        ("add", address_add, "accept mail for DOMAIN's LOCALPART"),
        ("remove", address_remove, "stop accepting mail for DOMAIN's LOCALPART"),
    ):
        parser = address_actions.add_parser(name, help=text)
        parser.add_argument("domain", help="the served domain")
        parser.add_argument("local_part", metavar="LOCALPART", help="the part before the @")
        parser.set_defaults(handler=handler)
    address_list = address_actions.add_parser("list", help="list DOMAIN's address list")
    address_list.add_argument("domain", help="the served domain")
    address_list.set_defaults(handler=address_list_command)


def _domain_errors(handler: Handler) -> Handler:
    """Report a refused domain operation as one line (exit status 1)."""

    @wraps(handler)
    async def run(args: argparse.Namespace, core: Any) -> int:
        try:
            return await handler(args, core)
        except DomainError as e:
            raise CommandError(e.message) from None

    return run


def _describe(domain: Domain) -> str:
    shown = domain.name
    if domain.unicode_name != domain.name:
        shown += f" ({domain.unicode_name})"
    return shown


@_domain_errors
async def domain_add(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.owner)
    domain: Domain = await core.domains.add(
        args.name, owner.id, args.redirect_to,
        spam_action=args.spam_action, virus_action=args.virus_action,
        require_tls=args.require_tls,
    )
    print(f"serving {_describe(domain)} for {owner.username}: mail goes to "
          f"{domain.redirect_to}")
    return 0


@_domain_errors
async def domain_list(args: argparse.Namespace, core: Any) -> int:
    owner_id = None
    if args.owner:
        owner_id = (await require_user(core, args.owner)).id
    found: list[Domain] = await core.domains.list(owner_id)
    names = {u.id: u.username for u in await core.identity.list_users()}
    print_table(
        ("DOMAIN", "OWNER", "REDIRECT TO", "SPAM", "VIRUS", "TLS"),
        [
            (d.name, names.get(d.owner_id, str(d.owner_id)), d.redirect_to,
             _action(d.spam_action), _action(d.virus_action),
             "required" if d.require_tls else "may")
            for d in found
        ],
    )
    return 0


def _action(value: int) -> str:
    return "quarantine" if value == 0 else "tag"


@_domain_errors
async def domain_remove(args: argparse.Namespace, core: Any) -> int:
    await core.domains.remove(args.name)
    print(f"no longer serving {args.name}")
    return 0


@_domain_errors
async def address_add(args: argparse.Namespace, core: Any) -> int:
    added: bool = await core.domains.add_address(args.domain, args.local_part)
    local = args.local_part.strip().lower()
    if added:
        print(f"{args.domain}: accepting {local}")
    else:
        print(f"{args.domain}: {local} was already accepted")
    return 0


@_domain_errors
async def address_remove(args: argparse.Namespace, core: Any) -> int:
    await core.domains.remove_address(args.domain, args.local_part)
    remaining: list[str] = await core.domains.list_addresses(args.domain)
    note = "" if remaining else " (list now empty: every local part is accepted)"
    print(f"{args.domain}: no longer accepting {args.local_part.strip().lower()}{note}")
    return 0


@_domain_errors
async def address_list_command(args: argparse.Namespace, core: Any) -> int:
    found: list[str] = await core.domains.list_addresses(args.domain)
    for local in found:
        print(local)
    return 0
