"""Spam and virus filters behind one interface, and a chain that combines them.

    from filters import build_chain, FilterUnavailable, ScanContext
    chain = build_chain(config.section("filters"), reactor=reactor, runner=cpu_pool)
    try:
        verdict = await chain.scan(message_bytes, ScanContext(mail_from=..., ...))
    except FilterUnavailable:
        ...  # keep the message queued, try again later: nothing passes unscanned
    verdict.spam, verdict.score, verdict.viruses, verdict.symbol_names, verdict.skipped

Modules: `interface` (Verdict, Filter, errors), `chain` (FilterChain, the combination
rule and failure policy), `builtin` (GTUBE, EICAR, zip bombs, dangerous attachments,
header sanity), `spamd`, `clamd`, `rspamd` (daemon clients), `config` (the `[filters]`
TOML section, every key documented there), `mime`/`archive`/`headers` (bounded parsing).
This package knows nothing of storage or HTTP APIs.
"""

from filters.builtin import BuiltinFilter, BuiltinSettings, analyse
from filters.chain import ChainEntry, FilterChain, combine
from filters.clamd import ClamdClient
from filters.config import build_chain
from filters.interface import (
    Filter,
    FilterError,
    FilterTimeout,
    FilterUnavailable,
    InlineFilter,
    MessageTooLarge,
    NotInline,
    Runner,
    ScanContext,
    Symbol,
    Verdict,
    scan_deferred,
)
from filters.rspamd import RspamdClient
from filters.spamd import SpamdClient

__all__ = [
    "BuiltinFilter",
    "BuiltinSettings",
    "ChainEntry",
    "ClamdClient",
    "Filter",
    "FilterChain",
    "FilterError",
    "FilterTimeout",
    "FilterUnavailable",
    "InlineFilter",
    "MessageTooLarge",
    "NotInline",
    "RspamdClient",
    "Runner",
    "ScanContext",
    "SpamdClient",
    "Symbol",
    "Verdict",
    "analyse",
    "build_chain",
    "combine",
    "scan_deferred",
]
