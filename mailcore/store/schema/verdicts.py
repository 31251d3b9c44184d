"""What the next hops of served domains answered about their recipients (migration 0068),
shared by the nodes of one store: the SMTP server's recipient verification
(mailcore.gateway.callout) asks a domain's next hop once per address and period, not once per
node or per RCPT.

One row per address (`address`, its domain lower-cased: a local part is case-sensitive):
whether the next hop took it (`deliverable`), its reply (`reply`, for the 550 we give a
refused one), and `expires_at` (epoch seconds): a row past it is no answer and is swept
(ix_recipient_verdicts_expires_at finds them)."""

from sqlalchemy import Boolean, Column, Float, Index, String, Table

from mailcore.store.schema.meta import metadata

recipient_verdicts = Table(
    "recipient_verdicts",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("deliverable", Boolean, nullable=False),
    Column("reply", String(512), nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_recipient_verdicts_expires_at", "expires_at"),
)
