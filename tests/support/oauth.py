"""OAuth 2 helpers for tests of Dropmyemail: register an app, get a code as if the user had
clicked Allow, exchange it at `POST /oauth/token` through StubTreq."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from mailcore.identity import User
from mailcore.oauth import OAuthProvider
from tests.support.web import Web

REDIRECT = "https://client.example/callback"


def pkce_pair(verifier: str = "v" * 43) -> tuple[str, str]:
    """(verifier, its S256 challenge)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_uri(client_id: str, **params: str | None) -> str:
    """The authorization request of `client_id` with `params` (None: leave one out)."""
    query: dict[str, str | None] = {"client_id": client_id, "response_type": "code",
                                    "scope": "read write", "redirect_uri": REDIRECT}
    query.update(params)
    return "http://127.0.0.1/oauth/authorize?" + urlencode(
        {k: v for k, v in query.items() if v is not None}
    )


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class Client:
    """A registered app and the web it talks to."""

    web: Web
    uid: str
    secret: str
    user: User

    async def code(self, **params: str) -> str:
        """A code, as if `user` allowed the authorization request with `params`."""
        location = await self.web.core.oauth.decide(
            authorize_uri(self.uid, **params), self.user.id, True
        )
        return query_of(location)["code"]

    async def exchange(self, **fields: str) -> tuple[int, dict[str, list[str]], Any]:
        """POST /oauth/token with the client's credentials in the form and `fields`."""
        data = {"client_id": self.uid, "client_secret": self.secret, **fields}
        return await self.web.call("POST", "/oauth/token", data=data)

    async def token(self, scope: str = "read write") -> dict[str, Any]:
        """A fresh token reply (access and refresh token) for `scope`."""
        code = await self.code(scope=scope)
        status, _, body = await self.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT
        )
        assert status == 200, body
        self.web.secrets.extend([body["access_token"], body["refresh_token"]])
        return dict(body)


async def register(web: Web, user: User, *uris: str, owner: User | None = None) -> Client:
    """An app owned by `owner` (default `user`) that `user` will authorize."""
    app, secret = await web.core.oauth.add_app(
        (owner or user).id, "Test client", list(uris) or [REDIRECT]
    )
    web.secrets.append(secret)
    return Client(web, app.uid, secret, user)


async def access_token(oauth: OAuthProvider, user_id: int, scope: str = "read write") -> str:
    """An access token of `user_id` for a new app, straight from the provider (no HTTP)."""
    app, secret = await oauth.add_app(user_id, "Test client", [REDIRECT])
    location = await oauth.decide(authorize_uri(app.uid, scope=scope), user_id, True)
    body = urlencode({"grant_type": "authorization_code", "code": query_of(location)["code"],
                      "redirect_uri": REDIRECT, "client_id": app.uid, "client_secret": secret})
    _, reply, status = await oauth.token(
        "https://x/oauth/token", body, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, reply
    return str(json.loads(reply)["access_token"])
