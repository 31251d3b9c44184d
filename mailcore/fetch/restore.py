"""Restore: put back into an account every backed-up message that is no longer there.

The job brings the backup up to date (one sync; when it fails, what is backed up is restored
all the same, then the job is retried from the sync by the runner's rules, as a migrate is:
`MailboxCopier.backup_synced`), then reads the account as it is now: for
each backed-up folder, whether it still exists, its UIDVALIDITY and its UIDs (one listed but
whose EXAMINE is refused NO [NONEXISTENT], or a plain NO as Dovecot answers for a folder
deleted while it had subfolders, is gone: `refused_as_deleted`). A backed-up
message is still there when its (UIDVALIDITY, UID) is, or when an earlier restore of this
account put it back at a (UIDVALIDITY, UID) that is still there and that no message of other
bytes is said to hold (an APPENDUID that named another message's place). Every other one is
copied back into its folder (made again when it was deleted) by `MailboxCopier.copy`, with
the same exactly-once rule as a migrate. A restore of an intact account appends nothing.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import Connection, select
from twisted.logger import Logger

from mailcore.fetch.errors import FetchError
from mailcore.fetch.imap import ARRIVING, ServerSpec
from mailcore.fetch.jobs import Job, JobFailed, JobRunner
from mailcore.fetch.migrate import MailboxCopier, Source, _classify, guarded, thd_backup_folders
from mailcore.fetch.writer import refused_as_deleted
from mailcore.store.schema import mailbox_job_items, mailbox_jobs

log = Logger()

_i = mailbox_job_items.c
_j = mailbox_jobs.c


def thd_restored_before(conn: Connection, account_id: int,
                        job_id: int) -> dict[int, tuple[int | None, int]]:
    """Blocking: where earlier restores of the account put backed-up messages back:
    message id -> (UIDVALIDITY, UID)."""
    rows = conn.execute(
        select(_i.message_row_id, _i.dest_uidvalidity, _i.dest_uid)
        .select_from(mailbox_job_items.join(mailbox_jobs, _j.id == _i.job_id))
        .where(_j.account_id == account_id, _j.kind == "restore", _j.id != job_id,
               _i.state.in_(("done", "present")), _i.dest_uid.is_not(None))
    )
    return {int(m): (v, int(u)) for m, v, u in rows}


def _claims(candidates: list[Source], before: dict[int, tuple[int | None, int]]
            ) -> dict[tuple[int | None, int], set[str]]:
    """(UIDVALIDITY, UID) -> the SHA-256 of each backed-up message said to be there: by its
    own place (a sync fetched it there) or by where an earlier restore put it (the server's
    APPENDUID). A place an earlier restore was given that another message's bytes also
    claim was told wrongly (a lying or broken server): it stands for neither, and the
    message it was given for is copied again (the copy first looks for it there)."""
    claims: dict[tuple[int | None, int], set[str]] = defaultdict(set)
    for source in candidates:
        if source.uid is not None:
            claims[(source.uidvalidity, source.uid)].add(source.sha256)
        if source.id in before:
            claims[before[source.id]].add(source.sha256)
    return claims


async def restore(copier: MailboxCopier, runner: JobRunner, job: Job) -> None:
    """The body of a restore job (module docstring)."""
    await copier.bring_backup_up_to_date(runner, job)
    account, password = await copier.accounts.credentials(job.account_id)
    if account.protocol != "imap":
        raise JobFailed("a POP3 account cannot be restored: POP3 cannot put mail back")
    spec = ServerSpec(host=account.host, port=account.port, use_ssl=account.use_ssl,
                      start_tls=account.start_tls, allow_cleartext=account.allow_cleartext,
                      username=account.username, password=password)
    creator = copier.creator(account.host, account.tls_ca_pem, account.tls_fingerprint)
    plans = await copier.db.read("mailbox_job_folders", thd_backup_folders, account.id)
    before = await copier.db.read("mailbox_restored_before", thd_restored_before,
                                  account.id, job.id)
    reader = await copier.open_reader(spec, creator)
    try:
        remote = {f.name.upper() if f.name.upper() == "INBOX" else f.name: f
                  for f in await guarded(reader.list_folders())}
        for plan in plans:
            key = "INBOX" if plan.name.upper() == "INBOX" else plan.name
            folder = remote.get(key)
            if folder is None or not folder.selectable:
                continue  # deleted: every message goes back, into the folder made again
            try:
                info = await reader.examine(folder.name)
            except FetchError as e:
                # Every backed-up message of a folder taken as gone goes back without a
                # look at what it holds: any other refusal of a folder that is there
                # (Office 365's "Server Unavailable", NOPERM) would put each in twice.
                if not refused_as_deleted(reader, e, folder.name,
                                          "\\HASCHILDREN" in folder.flags):
                    raise _classify(e) from None
                # Listed but not to be opened (Dovecot: deleted while it had subfolders):
                # as a \Noselect one, every message goes back.
                log.info("restore {job}: folder {folder!r} is listed but not to be opened "
                         "({e}); its messages go back", job=job.id, folder=folder.name, e=e)
                continue
            # At most the UIDs of what EXAMINE counted, and a margin for mail arriving.
            uids = set(await guarded(reader.uid_search(
                b"ALL", max_uids=info.exists + ARRIVING))) if info.exists else set()

            here = {(info.uidvalidity, uid) for uid in uids}
            claims = _claims(plan.candidates, before)
            missing = []
            for source in plan.candidates:
                if source.uid is not None and (source.uidvalidity, source.uid) in here:
                    plan.present_uids.add(source.uid)
                elif source.id in before and before[source.id] in here and (
                    claims[before[source.id]] == {source.sha256}
                ):
                    plan.present_uids.add(before[source.id][1])
                else:
                    missing.append(source)
            plan.candidates = missing
        await copier.copy(runner, job, spec, creator, plans, reader=reader)
    finally:
        await reader.close_session()
    await copier.backup_synced(runner, job)
