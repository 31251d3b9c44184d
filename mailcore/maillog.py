"""The operator's view of every message: one log line per message event, like Postfix's maillog.

Every line starts with the queue id (or `NOQUEUE` for mail refused before it had one), so
`grep 0KX7M3B2C4D5F6G twistd.log` tells a message's whole story:

    0KX7M3B2C4D5F6G: accepted client=203.0.113.5 helo=mx.example.net
        from=<a@example.net> size=4211 nrcpt=2 to=<bob@customer.test>,<carol@customer.test>
        tls=yes
    0KX7M3B2C4D5F6G: filtered verdict=spam score=7.2/5.0 filters=builtin,spamd
    0KX7M3B2C4D5F6G: quarantined nrcpt=1 to=<bob@customer.test> reason=spam
    0KX7M3B2C4D5F6G: delivered to=<carol@customer.test> relay=mx.customer.test:25
        delay=0.41 reply=250 2.0.0 Ok
    0KX7M3B2C4D5F6G: deferred to=<dave@other.test> relay=mx.other.test:25 delay=0.90
        reason=4.4.1 connection refused
    0KX7M3B2C4D5F6G: bounced to=<erin@other.test> relay=mx.other.test:25 delay=1.20
        reason=550 5.1.1 unknown user
    NOQUEUE: refused RCPT client=198.51.100.7 from=<x@spam.test> to=<y@elsewhere.test>:
        550 5.7.1 Relaying denied

(each is one line in the log; wrapped here).

The events go to the `mailcore.mail` log namespace at level info. Refusals before a queue
id (NOQUEUE: hostile clients) are subject to the daemon's repeated-line limit like any other
line; a line naming a queue id cannot repeat, and the limiter lets it pass untracked. Addresses are
shown between angle brackets and every value is made printable, so a line can never be
split or forged by what a client sent; a space in a value the client chose within the line
(its HELO name, an address: a quoted local part may hold one) is escaped as `\\x20`, so
that it cannot write fields of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.logger import Logger

from mailcore.logwriter import emit_text

log = Logger(namespace="mailcore.mail")

# The queue id of lines about mail refused before it had one.
NOQUEUE = "NOQUEUE"

# Recipients named in one line at the most; the rest are counted.
MAX_NAMED = 10


def printable(value: str, limit: int = 200) -> str:
    """`value` with control characters escaped and cut at `limit` characters."""
    if value.isprintable() and len(value) <= limit:
        return value
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value[:limit])
    return text + ("…" if len(value) > limit else "")


def token(value: str, limit: int = 200) -> str:
    """`value` made printable (see `printable`) with its spaces escaped too (`\\x20`): for a
    field in the middle of a line whose value a client chose (a HELO name, an address with
    a quoted local part), which could otherwise write fields of its own after it
    (`helo=x from=<forged@x> ...`)."""
    text = printable(value, limit)
    return text.replace(" ", "\\x20") if " " in text else text


def addresses(values: Iterable[str]) -> str:
    """`<a>,<b>` for at most MAX_NAMED addresses, then `(+N more)`."""
    items = list(values)
    shown = ",".join(f"<{token(a, 256)}>" for a in items[:MAX_NAMED])
    if len(items) > MAX_NAMED:
        shown += f" (+{len(items) - MAX_NAMED} more)"
    return shown


def _emit(queue_id: str, line: str) -> None:
    """One mail log line, formatted here once (see `mailcore.logwriter.emit_text`); a line
    naming its message's queue id can never be the same line twice (see the module
    docstring)."""
    emit_text(log, "{mail_line}", line, {"mail_line": line, "queue_id": queue_id},
              unique=queue_id != NOQUEUE)


def accepted(queue_id: str, *, client: str, helo: str, mail_from: str, size: int,
             recipients: Iterable[str], tls: bool) -> None:
    rcpts = list(recipients)
    _emit(queue_id,
          f"{queue_id}: accepted client={client or '-'} helo={token(helo) or '-'} "
          f"from=<{token(mail_from, 256)}> size={size} nrcpt={len(rcpts)} "
          f"to={addresses(rcpts)} tls={'yes' if tls else 'no'}")


def refused(stage: str, reply: str, *, client: str, mail_from: str | None = None,
            recipients: Iterable[str] = (), queue_id: str = NOQUEUE) -> None:
    """A recipient or message we refused (`reply` is what the client was told)."""
    extra = ""
    if mail_from is not None:
        extra += f" from=<{token(mail_from, 256)}>"
    rcpts = list(recipients)
    if rcpts:
        extra += f" to={addresses(rcpts)}"
    _emit(queue_id,
          f"{queue_id}: refused {stage} client={client or '-'}{extra}: "
          f"{printable(reply, 300)}")


def filtered(queue_id: str, *, verdict: str, score: float, threshold: float,
             filters: Iterable[str], detail: str = "") -> None:
    more = f" {printable(detail, 300)}" if detail else ""
    _emit(queue_id,
          f"{queue_id}: filtered verdict={verdict} score={score:.1f}/{threshold:.1f} "
          f"filters={','.join(filters) or '-'}{more}")


def kept(queue_id: str, outcome: str, recipients: Iterable[str], reason: str) -> None:
    """The pipeline kept mail back: `outcome` is quarantined, discarded or deferred."""
    rcpts = list(recipients)
    _emit(queue_id,
          f"{queue_id}: {outcome} nrcpt={len(rcpts)} to={addresses(rcpts)} "
          f"reason={printable(reason, 300)}")


def outcome(queue_id: str, state: str, recipients: Iterable[str], *, relay: str,
            delay: float, reply: str) -> None:
    """A delivery attempt's result for some recipients: delivered, deferred or bounced."""
    what = "reply" if state == "delivered" else "reason"
    _emit(queue_id,
          f"{queue_id}: {state} to={addresses(recipients)} relay={relay or '-'} "
          f"delay={max(0.0, delay):.2f} {what}={printable(reply, 500)}")
