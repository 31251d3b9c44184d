"""Simple IMAP2API (seed 001): the Klein app and what it is made of."""

from __future__ import annotations

from web.imap2api.app import Imap2ApiApp

__all__ = ["Imap2ApiApp"]
