"""The OAuth 2 provider (Dropmyemail, seed 000): clients, consent, authorization codes with
PKCE, and access and refresh tokens, built on oauthlib.

Empty for now: the provider lands here (web/dropmyemail.py only translates its wire
format). Only the auth routes are served today.
"""
