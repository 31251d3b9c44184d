"""`mailcore oauth …`: Dropmyemail's OAuth 2 apps and the grants users gave them.

`oauth app add` prints the app's uid (its client_id) and secret once; only a digest of the
secret is kept. `oauth grants USER` lists the apps holding live tokens of USER, and
`oauth revoke USER UID` ends them (access and refresh tokens, and unused codes).
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import command_group, print_table, refusals
from mailcore.cli.users import require_user, when
from mailcore.oauth import OAuthError


def register(subparsers: Any) -> None:
    """Add `oauth` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "oauth", help="Dropmyemail's OAuth 2 apps and users' grants",
        description="Third-party apps that act for users through OAuth 2 (/oauth/authorize, "
        "/oauth/token), and what users granted them.",
    )
    app = actions.add_parser("app", help="register, list and remove apps")
    app_actions = app.add_subparsers(dest="oauth_app_command", metavar="ACTION", required=True)
    add = app_actions.add_parser(
        "add", help="register an app (prints its uid and secret, once)",
        description="Register an app. Its redirect URIs must be absolute https:// URIs "
        "(http:// only to a loopback host: 127.0.0.1, [::1], localhost) without a fragment; "
        "an authorization request must name one of them exactly.",
    )
    add.add_argument("name", help="the app's name, shown on the consent page")
    add.add_argument("--owner", required=True, help="the owning user (name or email)")
    add.add_argument(
        "--redirect-uri", action="append", required=True, dest="redirect_uris",
        metavar="URI", help="a redirect URI (repeat for more)",
    )
    add.set_defaults(handler=app_add)
    listing = app_actions.add_parser("list", help="list apps")
    listing.add_argument("--owner", help="only this user's apps (name or email)")
    listing.set_defaults(handler=app_list)
    remove = app_actions.add_parser(
        "remove", help="delete an app with every code and token it holds"
    )
    remove.add_argument("uid", help="the app's uid (client_id)")
    remove.set_defaults(handler=app_remove)

    grants = actions.add_parser("grants", help="list the apps a user has let in")
    grants.add_argument("user", help="the user (name or email)")
    grants.set_defaults(handler=oauth_grants)
    revoke = actions.add_parser("revoke", help="revoke every token a user gave an app")
    revoke.add_argument("user", help="the user (name or email)")
    revoke.add_argument("uid", help="the app's uid (client_id)")
    revoke.set_defaults(handler=oauth_revoke)


_oauth_errors = refusals(OAuthError, lambda e: e.message)


@_oauth_errors
async def app_add(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.owner)
    app, secret = await core.oauth.add_app(owner.id, args.name, args.redirect_uris)
    print(f"app {app.name!r} for {owner.username}")
    print(f"uid: {app.uid}")
    print(f"secret: {secret}")
    return 0


@_oauth_errors
async def app_list(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.owner) if args.owner else None
    apps = await core.oauth.list_apps(owner.id if owner else None)
    print_table(
        ("UID", "NAME", "OWNER", "CREATED", "REDIRECT URIS"),
        [(a.uid, a.name, a.owner, when(a.created_at), " ".join(a.redirect_uris))
         for a in apps],
    )
    return 0


@_oauth_errors
async def app_remove(args: argparse.Namespace, core: Any) -> int:
    app = await core.oauth.remove_app(args.uid)
    print(f"removed app {app.uid} ({app.name})")
    return 0


@_oauth_errors
async def oauth_grants(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.user)
    grants = await core.oauth.grants(user.id)
    print_table(
        ("UID", "NAME", "OWNER", "SCOPES", "SINCE", "TOKENS"),
        [(g.app.uid, g.app.name, g.app.owner, " ".join(g.scopes), when(g.since),
          str(g.tokens)) for g in grants],
    )
    return 0


@_oauth_errors
async def oauth_revoke(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.user)
    count = await core.oauth.revoke(user.id, args.uid)
    print(f"revoked {count} token(s) of {user.username} for app {args.uid}")
    return 0
