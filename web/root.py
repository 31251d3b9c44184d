"""Placeholder: replaced by the web skeleton."""

from twisted.web.resource import Resource
from twisted.web.server import Site


def build_site(core):  # type: ignore[no-untyped-def]
    return Site(Resource())
