"""The OAuth 2 provider (Dropmyemail, seed 000): clients, consent, authorization codes with
PKCE, and access and refresh tokens, built on oauthlib.

`OAuthProvider` (provider.py) is the service: apps and grants for the CLI and the pages,
the authorization, token and revocation (RFC 7009) endpoints for web/dropmyemail.py (which
only translates HTTP), and `resolve` for the Bearer tokens of `/v1/`. Our rules for
oauthlib are in validator.py; `[oauth]` in settings.py.
"""

from mailcore.oauth.provider import (
    CLIENT_CHALLENGE,
    App,
    AuthorizationRedirect,
    AuthorizationRefused,
    Consent,
    Grant,
    OAuthError,
    OAuthProvider,
    OAuthPruner,
    SessionEnded,
    token_client,
)
from mailcore.oauth.settings import CODE_TTL, OAuthSettings
from mailcore.oauth.validator import SCOPES

__all__ = [
    "CLIENT_CHALLENGE",
    "CODE_TTL",
    "SCOPES",
    "App",
    "AuthorizationRedirect",
    "AuthorizationRefused",
    "Consent",
    "Grant",
    "OAuthError",
    "OAuthProvider",
    "OAuthPruner",
    "OAuthSettings",
    "SessionEnded",
    "token_client",
]
