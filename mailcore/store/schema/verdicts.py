"""What the next hops of served domains answered about their recipients (migration 0068),
shared by the nodes of one store: the SMTP server's recipient verification
(mailcore.gateway.callout) asks a domain's next hop once per address and period, not once per
node or per RCPT.

One row per address (`address`, its domain lower-cased: a local part is case-sensitive):
the route that was asked (`domain_id`, the served domain's id, never given again, and
`hop`, its next hop's label, host:port), whether that next hop took it (`deliverable`),
its reply (`reply`, for the 550 we give a refused one), and `expires_at` (epoch seconds): a
row past it, or of another domain id or next hop than the address's route now (the domain
redirected, or removed and added again), is no answer; expired rows are swept
(ix_recipient_verdicts_expires_at finds them), and one of another route is replaced by the
next answer."""

from sqlalchemy import Boolean, Column, Float, Index, Integer, String, Table

from mailcore.store.schema.meta import metadata

recipient_verdicts = Table(
    "recipient_verdicts",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("domain_id", Integer, nullable=False),
    Column("hop", String(300), nullable=False),
    Column("deliverable", Boolean, nullable=False),
    Column("reply", String(512), nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_recipient_verdicts_expires_at", "expires_at"),
)
