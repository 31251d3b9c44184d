"""`mailcore domain …` and `mailcore address …`: the served domains and their address lists.

A running daemon serves changes made here within about its `[domains] poll_interval` (0.5 s):
each change raises the store's domain change counter, which every node polls before
reloading its in-memory RCPT snapshot; its queue picks up a changed next hop or TLS policy
within `[queue] route_cache_seconds` (30 s).

Each domain may override the outbound STARTTLS policy of `[queue] tls` (default
verify-if-offered) with `--tls`: "may" for a customer's server with a self-signed
certificate, "verify" to refuse cleartext altogether (`--require-tls` is the same as
`--tls verify`), "default" to follow `[queue] tls` again.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import CommandError, command_group, in_cli_words, print_table, refusals
from mailcore.cli.users import require_user
from mailcore.gateway.domains import Domain, DomainError
from mailcore.gateway.verification import CheckResult, verification_record
from mailcore.queue.settings import TLS_POLICIES, effective_tls

TLS_CHOICES = ("default", *TLS_POLICIES)
NEXT_HOP_RULES = (
    "never this gateway's own SMTP listener; a loopback or private address only when "
    "[queue] allow_loopback / allow_private / allow_networks allow it"
)
TLS_HELP = (
    "outbound STARTTLS to the next hop: none; may (encrypt if offered, certificate not "
    "checked: for self-signed servers); verify-if-offered (if offered, the certificate must "
    "verify, else the mail waits); verify (verified TLS or the mail waits); default: follow "
    "[queue] tls (verify-if-offered unless configured)"
)


def register(subparsers: Any) -> None:
    """Add `domain` and `address` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "domain", help="add, change, list and remove served domains",
        description="The domains this gateway is MX for, and where their mail goes next.",
    )
    add = actions.add_parser(
        "add", help="serve a domain",
        description="Serve a domain: accept its mail and relay it to --redirect-to. The "
        "name may be given in Unicode; it is stored in IDNA form.",
    )
    add.add_argument("name", help="the domain, e.g. example.com")
    add.add_argument("--owner", required=True, help="the owning user (name or email)")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--redirect-to", metavar="HOST[:PORT]",
        help="next hop: host, host:port, [IPv6]:port or [IPv4] (port 25 when absent); "
        + NEXT_HOP_RULES,
    )
    where.add_argument(
        "--local", action="store_true",
        help="hosted: keep the mail of its mailboxes here (`mailcore mailbox add`, the "
        "Mail API) instead of relaying it; other addresses bounce",
    )
    add.add_argument("--spam-action", type=int, choices=(0, 1), default=0,
                     help="0: quarantine spam (default), 1: tag it and deliver")
    add.add_argument("--virus-action", type=int, choices=(0, 1), default=0,
                     help="0: quarantine viruses (default), 1: tag them and deliver")
    tls = add.add_mutually_exclusive_group()
    tls.add_argument("--tls", choices=TLS_CHOICES, default="default", metavar="POLICY",
                     help=TLS_HELP + " (when omitted: default)")
    tls.add_argument("--require-tls", action="store_true",
                     help="deliver to the next hop only over verified TLS (= --tls verify)")
    add.add_argument("--verified", action="store_true",
                     help="with [protecmail] verify_domains on: serve the domain at once, "
                     "without its DNS proof of ownership (you vouch for the owner)")
    add.set_defaults(handler=domain_add)

    change = actions.add_parser(
        "set", help="change a served domain's settings",
        description="Change a served domain's next hop, actions or TLS policy; options left "
        "out keep their value.",
    )
    change.add_argument("name", help="the domain")
    change.add_argument("--redirect-to", metavar="HOST[:PORT]",
                        help="next hop: host, host:port, [IPv6]:port or [IPv4]; "
                        + NEXT_HOP_RULES)
    change.add_argument("--spam-action", type=int, choices=(0, 1),
                        help="0: quarantine spam, 1: tag it and deliver")
    change.add_argument("--virus-action", type=int, choices=(0, 1),
                        help="0: quarantine viruses, 1: tag them and deliver")
    change.add_argument("--tls", choices=TLS_CHOICES, metavar="POLICY", help=TLS_HELP)
    change.set_defaults(handler=domain_set)

    listing = actions.add_parser("list", help="list served domains")
    listing.add_argument("--owner", help="only this user's domains (name or email)")
    listing.set_defaults(handler=domain_list)

    verify = actions.add_parser(
        "verify", help="print a domain's ownership record and look it up now",
        description="With [protecmail] verify_domains on, a domain added without --verified "
        "is served only once the DNS TXT record _mailcore-verify.DOMAIN carries "
        '"mailcore-verify=TOKEN". Look for it now ([protecmail] dns_servers, else the system '
        "resolver): exit 0 when the domain is verified, else 1 with the reason and the record "
        "to publish.",
    )
    verify.add_argument("name", help="the domain")
    verify.set_defaults(handler=domain_verify)

    remove = actions.add_parser("remove", help="stop serving a domain (and drop its list)")
    remove.add_argument("name", help="the domain")
    remove.set_defaults(handler=domain_remove)

    address_actions = command_group(
        subparsers, "address", help="manage a domain's accepted local parts",
        description="A domain with an address list accepts mail only for the listed local "
        "parts (550 5.1.1 for others); a domain with an empty list accepts every local part.",
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


# The options that set the fields a DomainError may name (the API's spelling or ours).
DOMAIN_OPTIONS = {
    "redirectTo": "--redirect-to", "tls": "--tls", "require_tls": "--require-tls",
    "spam_action": "--spam-action", "virus_action": "--virus-action",
}
_domain_errors = refusals(DomainError, lambda e: in_cli_words(e.message, e.field, DOMAIN_OPTIONS))


def _describe(domain: Domain) -> str:
    shown = domain.name
    if domain.unicode_name != domain.name:
        shown += f" ({domain.unicode_name})"
    return shown


@_domain_errors
async def domain_add(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.owner)
    domain: Domain = await core.domains.add(
        args.name, owner.id, args.redirect_to or "",
        spam_action=args.spam_action, virus_action=args.virus_action,
        tls="verify" if args.require_tls else args.tls,
        # The operator vouches for what they add, unless they ask for the DNS proof.
        verified=args.verified or not core.domains.verify_domains,
        hosted=args.local,
    )
    record = verification_record(domain)
    if record is not None:
        print(f"added {_describe(domain)} for {owner.username}, not served until its owner "
              f"publishes {record.zone_line()} (`mailcore domain verify {domain.name}` looks "
              "now; the daemon looks every [protecmail] verify_interval)")
        return 0
    if domain.hosted:
        print(f"serving {_describe(domain)} for {owner.username}: mail is kept in its "
              "mailboxes here (mailcore mailbox add)")
        return 0
    print(f"serving {_describe(domain)} for {owner.username}: mail goes to "
          f"{domain.redirect_to}, TLS {_tls(domain, core)}")
    return 0


@_domain_errors
async def domain_verify(args: argparse.Namespace, core: Any) -> int:
    result: CheckResult = await core.verifier.check(args.name)
    domain = result.domain
    record = verification_record(domain)
    if record is None:
        print(f"{domain.name} needs no proof of ownership (added while verification was off, "
              "or with --verified)")
    elif result.verified:
        print(f"{domain.name} is verified ({record.name} carries its token) and served")
    else:
        raise CommandError(f"{domain.name} is not verified: {result.detail}; publish "
                           f"{record.zone_line()}")
    return 0


@_domain_errors
async def domain_set(args: argparse.Namespace, core: Any) -> int:
    changes: dict[str, Any] = {}
    for option in ("redirect_to", "spam_action", "virus_action", "tls"):
        value = getattr(args, option)
        if value is not None:
            changes[option] = value
    if not changes:
        raise CommandError("nothing to change: give --redirect-to, --spam-action, "
                           "--virus-action or --tls")
    domain: Domain = await core.domains.update(args.name, changes)
    print(f"{_describe(domain)}: mail goes to {domain.redirect_to}, TLS {_tls(domain, core)}, "
          f"spam: {_action(domain.spam_action)}, viruses: {_action(domain.virus_action)}")
    return 0


def _tls(domain: Domain, core: Any) -> str:
    """The TLS policy mail to the domain's next hop gets, and whether it is the default."""
    policy = effective_tls(domain.tls, core.queue.settings.tls)
    return policy if domain.tls is not None else f"{policy} (default)"


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
            (d.name + (" (unverified)" if d.pending else ""),
             names.get(d.owner_id, str(d.owner_id)), d.redirect_to or "(hosted here)",
             _action(d.spam_action), _action(d.virus_action),
             _tls(d, core))
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
