"""The stage between the spool and delivery: what happens to an accepted message.

Every message passes through `Pipeline.process` before it is sent. A pipeline is a chain of
stages (the filtering stage adds spam and virus filters and the per-domain policy); each
stage may return a Decision, and the first one that does not say "deliver" wins. With no
stages, everything is delivered unchanged and the queue runner skips the pipeline
altogether (no body load, no wait).

The queue runner processes a message once its recipients are routed and before it is put
on a next hop's queue, so no connection is taken (or held) while a filter works; at most
`max_scans` messages are processed at a time, the others wait their turn.

Decisions the queue runner carries out:
- DELIVER: send the message as it is.
- TAG: send it with extra header fields prepended (e.g. `X-Spam-Flag: YES`); the tags
  travel with the queued delivery and are applied when the body is sent.
- QUARANTINE: keep the message in `quarantine` (set by the filtering issue) and finish the
  recipients as `quarantined`, in one transaction of the spool's write lane (a crash can
  never leave the message kept and still queued, to be filtered and maybe delivered
  again); without a quarantine store, the message stays queued.
- DISCARD: finish the recipients without sending (policy "drop"), with the reason logged.
- DEFER: leave the message queued and try again later (a filter is down, the owner's
  filtering tokens are spent): a temporary failure, nothing is lost.

A decision other than QUARANTINE may name some recipients in `quarantine`: those are
quarantined and the others get the decision (DEFER too) (recipients of domains with different
policies can share one delivery). `subject_prefix` is put before the Subject of a TAG.

`FilteringStage` is the filtering issue's stage: filter chain, tokens, domain policy.

A stage that can often decide at once (the built-in filters on a small message whose
tokens were charged when it was stored) also has `process_now`: the same decision as a
plain call, or `LATER` when it has to wait, said before it did anything. The queue runner
asks `Pipeline.process_now` first and awaits `Pipeline.process` only for what has to wait.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.header import Header
from typing import Literal, Protocol

from sqlalchemy import Connection

from mailcore.smtp.fold import ascii_escaped, fold


class Action(enum.Enum):
    DELIVER = "deliver"
    TAG = "tag"
    QUARANTINE = "quarantine"
    DISCARD = "discard"
    DEFER = "defer"


@dataclass(frozen=True)
class Decision:
    """What to do with one message for the recipients it was processed for."""

    action: Action = Action.DELIVER
    add_headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    quarantine: tuple[str, ...] = ()  # addresses to quarantine while the others go on
    subject_prefix: str = ""
    category: str = ""  # "spam", "virus" or "oversize" (unscanned) for a quarantine

    @classmethod
    def deliver(cls) -> Decision:
        return _DELIVER


_DELIVER = Decision()


@dataclass(frozen=True)
class PipelineRecipient:
    address: str
    domain_id: int | None
    charged: bool = False  # its filtering tokens were charged when the message was stored


@dataclass(frozen=True)
class PipelineMessage:
    """An accepted message on its way out, with the recipients of this delivery."""

    queue_id: str
    kind: str
    mail_from: str
    recipients: tuple[PipelineRecipient, ...]
    body: bytes
    extra: dict[str, object] = field(default_factory=dict)


class Stage(Protocol):
    """One step of the chain (a filter plus the policy that acts on its verdict)."""

    async def process(self, message: PipelineMessage) -> Decision | None: ...


class _Later(enum.Enum):
    LATER = "later"


# A stage's `process_now` answer when it has to wait: await its `process` instead (nothing
# was done yet).
LATER = _Later.LATER
Later = Literal[_Later.LATER]


class NowStage(Stage, Protocol):
    """A stage that can often decide as a plain call (see the module docstring)."""

    def process_now(self, message: PipelineMessage) -> Decision | Later | None:
        """`process`'s decision at once, or LATER (with nothing done) when it must wait."""
        ...


@dataclass
class Resume:
    """Where `Pipeline.process_now` stopped: the stage that has to wait (the earlier ones
    have decided) and what they said; `Pipeline.process(message, resume)` goes on from
    there."""

    stage: int = 0
    tags: list[tuple[str, str]] = field(default_factory=list)
    prefix: str = ""
    reasons: list[str] = field(default_factory=list)

    def add(self, decision: Decision | None) -> Decision | None:
        """Take a stage's decision: the pipeline's when it is final, else None."""
        if decision is None or decision.action is Action.DELIVER:
            return None
        if decision.action is Action.TAG and not decision.quarantine:
            self.tags.extend(decision.add_headers)
            self.prefix = decision.subject_prefix or self.prefix
            if decision.reason:
                self.reasons.append(decision.reason)
            return None
        return decision

    def result(self) -> Decision:
        """The decision once every stage said to deliver (maybe tagged)."""
        if self.tags or self.prefix:
            return Decision(Action.TAG, tuple(self.tags), reason="; ".join(self.reasons),
                            subject_prefix=self.prefix)
        return Decision.deliver()


class QuarantineStore(Protocol):
    """Where quarantined messages are kept (mailcore.gateway.quarantine)."""

    def thd_keep(self, conn: Connection, message: PipelineMessage, decision: Decision,
                 now: float) -> None:
        """Blocking: keep `message` for the decision's recipients (all of them for a
        QUARANTINE, else those named in `decision.quarantine`) in the caller's transaction,
        the one that records them quarantined. A replay keeps nothing twice."""
        ...

# Messages processed at the same time by one queue runner, at most (`[pipeline] max_scans`).
DEFAULT_MAX_SCANS = 32


class Pipeline:
    """A chain of stages; with none, every message is delivered as it came."""

    def __init__(
        self,
        stages: Sequence[Stage] = (),
        quarantine: QuarantineStore | None = None,
        max_scans: int = DEFAULT_MAX_SCANS,
    ) -> None:
        self.stages = list(stages)
        self.quarantine = quarantine
        self.max_scans = max_scans

    async def process(self, message: PipelineMessage, resume: Resume | None = None) -> Decision:
        """The decision for `message`: the first stage's non-deliver decision, else deliver
        (tagged with what the stages tagged). With `resume` (from `process_now`), from the
        stage that had to wait on."""
        tally = resume or Resume()
        for stage in self.stages[tally.stage:]:
            final = tally.add(await stage.process(message))
            if final is not None:
                return final
        return tally.result()

    def process_now(self, message: PipelineMessage) -> Decision | Resume:
        """`process`'s decision as a plain call, as far as the stages can decide at once
        (`NowStage`): the decision, or where to resume it (`process(message, resume)`)."""
        tally: Resume | None = None
        for index, stage in enumerate(self.stages):
            now = getattr(stage, "process_now", None)
            decision = LATER if now is None else now(message)
            if decision is LATER:
                tally = tally or Resume()
                tally.stage = index
                return tally
            if decision is None or decision.action is Action.DELIVER:
                continue  # (the usual clean message: no tally made)
            tally = tally or Resume()
            final = tally.add(decision)
            if final is not None:
                return final
        return Decision.deliver() if tally is None else tally.result()


def apply_tags(
    body: bytes, headers: Sequence[tuple[str, str]], subject_prefix: str = ""
) -> bytes:
    """The body with header fields added after its leading trace fields and, with
    `subject_prefix`, the Subject starting with it (added when absent).

    The added values come from filters (rspamd returns up to 1,000 symbols of up to 128
    characters): each field is folded, at 78 octets where it can be and after the commas
    of a list, never past 998 (`mailcore.smtp.fold`), without control characters, and
    ASCII (a non-ASCII symbol name is written `\\x{HHHH}`: the message may not be one that
    said SMTPUTF8, RFC 6532)."""
    # Only the header section changes: it is rewritten on its own and joined to the rest
    # once. (Rewritten whole, a 53 MB message was copied four times, 45-93 ms of CPU and
    # 159 MB; the queue runner runs this off the reactor for a large body, and bytes.join
    # copies a large one without holding the interpreter's lock.)
    end = body.find(b"\r\n\r\n")
    head_end = len(body) if end < 0 else end + 2
    head = body[:head_end]
    if subject_prefix:
        head = _prefix_subject(head, subject_prefix)
    lines = b"".join(
        (fold(name, ascii_escaped(value), commas=True) + "\r\n").encode()
        for name, value in headers
    )
    at = _after_trace(head)
    if head_end == len(body):
        return head[:at] + lines + head[at:]
    return b"".join((head[:at], lines, head[at:], memoryview(body)[head_end:]))


_TRACE = re.compile(rb"(?i)(?:received|return-path):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def _after_trace(body: bytes) -> int:
    """Where the leading trace fields (Return-Path, Received, with their folded lines)
    end: RFC 5322 3.6 keeps them in a block at the top, so added fields go after them."""
    pos = 0
    while (m := _TRACE.match(body, pos)) is not None:
        pos = m.end()
    return pos


_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*")


def _encoded(text: str) -> bytes:
    """`text` as header bytes: as it is when ASCII, else one RFC 2047 word (a header field
    may not hold raw 8-bit text for a next hop that did not offer SMTPUTF8)."""
    if text.isascii():
        return text.encode("ascii")
    return Header(text, "utf-8").encode().encode("ascii")


def _prefix_subject(body: bytes, prefix: str) -> bytes:
    """Put `prefix` before the first Subject field's value (in the header block only); a
    message without one gets one, after its trace fields like the other added fields. A
    non-ASCII prefix goes in as an encoded word; before an encoded word its space goes
    inside it (the space between two encoded words is not part of the text)."""
    end = body.find(b"\r\n\r\n")
    head_end = len(body) if end < 0 else end + 2
    m = _SUBJECT.search(body, 0, head_end)
    if m is None:
        at = _after_trace(body)
        return body[:at] + b"Subject: " + _encoded(prefix) + b"\r\n" + body[at:]
    rest = body[m.end():]
    if prefix.isascii():
        tag = prefix.encode("ascii")
        if rest.startswith(tag):
            return body
        return body[:m.end()] + tag + b" " + rest
    plain, spaced = _encoded(prefix), _encoded(prefix + " ")
    if rest.startswith(plain) or rest.startswith(spaced):
        return body
    tag = spaced if rest.startswith(b"=?") else plain
    return body[:m.end()] + tag + b" " + rest
