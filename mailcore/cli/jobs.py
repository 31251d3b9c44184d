"""`mailcore jobs …`: see and stop Dropmyemail's migrate and restore jobs.

`list` shows jobs (newest first; `--status`, `--kind`, `--user` narrow it), `show ID` one job
with its destination, progress, attempts and the node running it, `cancel ID` fails a queued
or running job as "cancelled by an operator". These work on the store directly; the node
running a cancelled job stops it at its next batch of messages or lease renewal, and what it
already copied stays copied.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from mailcore.cli import CommandError, command_group, limit, print_table, utc_seconds
from mailcore.fetch.jobs import (
    KINDS,
    STATUSES,
    Job,
    JobError,
    thd_cancel_job,
    thd_get_job,
    thd_list_jobs,
)


def register(subparsers: Any) -> None:
    """Add `jobs` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "jobs", help="list, show and cancel migrate and restore jobs",
        description="Dropmyemail's migrate and restore jobs: each copies backed-up mail into "
        "an IMAP mailbox in the background, on one node.",
    )
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only jobs with this status")
    listing.add_argument("--kind", choices=KINDS, help="only migrates or only restores")
    listing.add_argument("--user", help="only the jobs of this user (name or e-mail)")
    listing.add_argument("--limit", type=limit, default=100,
                         help="show at most this many jobs [100]")
    listing.set_defaults(handler=jobs_list)
    show = actions.add_parser("show", help="one job: destination, progress, attempts")
    show.add_argument("id", type=_job_id, help="the job id (from `jobs list` or the API)")
    show.set_defaults(handler=jobs_show)
    cancel = actions.add_parser("cancel", help="stop a queued or running job (it fails as "
                                "cancelled; what it copied stays)")
    cancel.add_argument("id", type=_job_id, help="the job id")
    cancel.set_defaults(handler=jobs_cancel)


def _job_id(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise argparse.ArgumentTypeError(f"not a job id: {text!r}")
    return int(text)


def _when(moment: datetime.datetime | None) -> str:
    return utc_seconds(moment.timestamp()) if moment is not None else "-"


def _progress(job: Job) -> str:
    return f"{job.downloaded}/{job.messages}"


async def jobs_list(args: argparse.Namespace, core: Any) -> int:
    user_id = None
    if args.user:
        user = await core.identity.find_user(args.user)
        if user is None:
            raise CommandError(f"no user {args.user!r}")
        user_id = user.id
    jobs: list[Job] = await core.db.read(
        "jobs_list", lambda conn: thd_list_jobs(
            conn, user_id=user_id, kind=args.kind, status=args.status, sort="id",
            direction="desc", limit=args.limit, now=core.clock.seconds(),
            with_message_ids=False))
    rows = [[str(j.id), j.kind, j.status, str(j.account_id),
             j.email if j.kind == "migrate" else "-", _progress(j), str(j.attempts),
             _when(j.start_time), j.lease_owner or "-", j.reason or ""] for j in jobs]
    if rows:
        print_table(["ID", "KIND", "STATUS", "ACCOUNT", "DESTINATION", "DONE", "TRIES",
                     "STARTED (UTC)", "NODE", "REASON"], rows)
    print(f"{len(rows)} job(s) shown")
    return 0


async def jobs_show(args: argparse.Namespace, core: Any) -> int:
    job: Job | None = await core.db.read(
        "jobs_show", lambda conn: thd_get_job(conn, args.id, now=core.clock.seconds()))
    if job is None:
        raise CommandError(f"no job {args.id}")
    print(f"ID:          {job.id}")
    print(f"Kind:        {job.kind}")
    print(f"Status:      {job.status}")
    if job.reason:
        print(f"Reason:      {job.reason}")
    print(f"User:        {job.user_id}")
    print(f"Account:     {job.account_id}")
    if job.kind == "migrate":
        print(f"Destination: {job.username} at {job.host}:{job.port} "
              f"({'TLS' if job.use_ssl else 'STARTTLS' if job.start_tls else 'cleartext'})")
    print(f"Progress:    {job.downloaded} of {job.messages} message(s) dealt with, "
          f"{job.appended} appended, {job.restore_size} bytes planned")
    print(f"Attempts:    {job.attempts}")
    if job.status == "queued" and job.next_attempt_at > core.clock.seconds():
        print(f"Next try:    {utc_seconds(job.next_attempt_at)} UTC")
    print(f"Created:     {_when(job.created_at)} UTC")
    print(f"Started:     {_when(job.start_time)}")
    print(f"Ended:       {_when(job.end_time)}")
    print(f"Running on:  {job.lease_owner or '-'}")
    return 0


async def jobs_cancel(args: argparse.Namespace, core: Any) -> int:
    now = datetime.datetime.fromtimestamp(core.clock.seconds(), datetime.UTC)
    try:
        job: Job | None = await core.db.run("jobs_cancel", thd_cancel_job, args.id, now)
    except JobError as e:
        raise CommandError(str(e)) from None
    if job is None:
        raise CommandError(f"no job {args.id}")
    print(f"cancelled job {job.id} ({job.kind}); a node running it stops at its next batch")
    return 0
