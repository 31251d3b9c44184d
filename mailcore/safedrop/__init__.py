"""Secure file drops (seed 003): bundles, recipients, files, expiry, passwords and
self-destruct, and the recipients' download page.

Empty for now: the drop services land here (web/safedrop.py only translates its wire
format). Only its auth routes are served today.
"""
