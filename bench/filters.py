"""Filter throughput: the built-in chain alone, and with each real daemon, in messages/s.

Each daemon's own sequential rate is measured in the same run, two ways: its command-line
client in a loop (spamc, clamdscan --stream, rspamc; one process per message, as a
Postfix content filter script would do) and our client alone, one message at a time. The
chain is measured one message at a time and with several messages in flight (the queue
runner scans concurrently).

    .venv/bin/python bench/filters.py [--seconds 5] [--concurrency 8] [--json out.json]

Daemons are started like the integration tests do (tests/support/filterd.py: 127.0.0.1,
free ports, temp dirs, spamd with 2 children, clamd with an EICAR-only database, rspamd with
one normal worker); a daemon that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unittest
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, protocol, task

from filters.builtin import EICAR
from filters.chain import FilterChain
from filters.config import build_chain
from filters.interface import ScanContext
from mailcore.workers import CpuPool
from tests.support import filterd
from tests.support.filterd import attachment, multipart, text_part, zip_bytes

CONTEXT = ScanContext(mail_from="alice@example.com", recipients=("bob@example.org",),
                      client_ip="127.0.0.1", helo="mail.example.com", queue_id="BENCH")

_WORDS = (b"the quarterly report shows steady growth in every region and the board "
          b"would like to discuss the numbers at the next meeting on thursday ")


def corpus() -> list[bytes]:
    """Five messages cycled: plain text, HTML alternative, PDF, zip, and an EICAR file."""
    text = (_WORDS * 30)[:4000]
    plain = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
             b"Subject: Quarterly report\r\nDate: " + formatdate().encode() + b"\r\n"
             b"Message-ID: <bench.1@example.com>\r\n\r\n" + text + b"\r\n")
    html = (b"<html><body><p>" + text.replace(b" and ", b" <b>and</b> ") + b"</p></body></html>")
    alternative = multipart([
        text_part(text),
        ([("Content-Type", "text/html; charset=utf-8")], html),
    ], subtype="alternative")
    pdf = multipart([text_part(text[:500]),
                     attachment("report.pdf", b"%PDF-1.4\n" + os.urandom(45_000),
                                "application/pdf")])
    archive = multipart([text_part(text[:500]), attachment("data.zip", zip_bytes({
        "q1.csv": text * 4, "q2.csv": text * 4, "notes.txt": text}), "application/zip")])
    virus = multipart([text_part(b"see attached"), attachment("eicar.com.txt", EICAR)])
    return [plain, alternative, pdf, archive, virus]


async def measure(
    scan: Callable[[bytes], Awaitable[Any]], messages: Sequence[bytes], seconds: float,
    concurrency: int = 1, minimum: int = 20,
) -> float:
    """Messages per second over at least `seconds` and `minimum` messages."""
    # One warm-up pass: first scans pay for rule compilation and connection set-up.
    for msg in messages:
        await scan(msg)
    done = 0
    started = time.perf_counter()

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() - started < seconds or done < minimum:
            await scan(messages[i % len(messages)])
            done += 1
            i += 1

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(k)) for k in range(concurrency)])
    return done / (time.perf_counter() - started)


class _Feed(protocol.ProcessProtocol):
    """Writes a message to a child's stdin and fires `ended` when it exits."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.data)
        transport.closeStdin()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def tool_scanner(reactor: Any, argv: list[str]) -> Callable[[bytes], Awaitable[None]]:
    """A scan function running `argv` once per message, the message on stdin."""

    async def scan(msg: bytes) -> None:
        feed = _Feed(msg)
        reactor.spawnProcess(feed, argv[0], argv, env=dict(os.environ))
        await feed.ended

    return scan


def chain_scanner(chain: FilterChain) -> Callable[[bytes], Awaitable[Any]]:
    async def scan(msg: bytes) -> Any:
        return await chain.scan(msg, CONTEXT)

    return scan


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    messages = corpus()
    cpu = CpuPool(reactor)
    results: dict[str, Any] = {
        "corpus": {"messages": len(messages),
                   "mean_bytes": sum(map(len, messages)) // len(messages)},
        "concurrency": args.concurrency,
        "filters": {},
    }

    async def chain_rates(section: dict[str, Any]) -> tuple[FilterChain, float, float]:
        chain = build_chain(section, reactor=reactor, runner=cpu)
        seq = await measure(chain_scanner(chain), messages, args.seconds)
        par = await measure(chain_scanner(chain), messages, args.seconds, args.concurrency)
        return chain, seq, par

    chain, seq, par = await chain_rates({})
    results["filters"]["builtin"] = {"chain_seq": seq, "chain_concurrent": par}
    await chain.close()

    daemons: dict[str, Callable[[], Awaitable[filterd.Daemon]]] = {
        "spamd": filterd.spamd, "clamd": filterd.clamd, "rspamd": filterd.rspamd}
    for name, start in daemons.items():
        try:
            daemon = await start()
        except (unittest.SkipTest, RuntimeError) as e:
            results["filters"][name] = {"skipped": str(e)}
            continue
        # "Our client alone": the daemon's client in a chain of one, one message at a time.
        alone = build_chain({"enabled": [name], name: {"address": daemon.address}},
                            reactor=reactor, runner=cpu)
        client_seq = await measure(chain_scanner(alone), messages, args.seconds)
        await alone.close()
        tool, argv = _tool(name, daemon)
        tool_seq = await measure(tool_scanner(reactor, argv), messages, args.seconds)
        section = {"enabled": ["builtin", name], name: {"address": daemon.address}}
        chain, seq, par = await chain_rates(section)
        await chain.close()
        results["filters"][name] = {
            "tool": tool, "tool_seq": tool_seq, "client_seq": client_seq,
            "chain_seq": seq, "chain_concurrent": par,
        }
    cpu.stop()
    return results


def _tool(name: str, daemon: filterd.Daemon) -> tuple[str, list[str]]:
    from tests.support.servers import find_binary

    if name == "spamd":
        return "spamc", [find_binary("spamc") or "spamc", "-d", "127.0.0.1",
                         "-p", str(daemon.port), "-c"]
    if name == "clamd":
        return "clamdscan", [find_binary("clamdscan") or "clamdscan",
                             f"--config-file={daemon.directory / 'clamd.conf'}",
                             "--stream", "--no-summary", "--quiet", "-"]
    return "rspamc", [find_binary("rspamc") or "rspamc", "-h", daemon.address]


def report(results: dict[str, Any]) -> str:
    c = results["concurrency"]
    lines = [
        f"filters: corpus of {results['corpus']['messages']} messages, "
        f"mean {results['corpus']['mean_bytes']} bytes; messages/s",
        f"{'filter':<9}{'daemon tool seq':>22}{'our client seq':>16}{'chain seq':>12}"
        f"{f'chain x{c}':>12}",
    ]
    for name, r in results["filters"].items():
        if "skipped" in r:
            lines.append(f"{name:<9} skipped: {r['skipped']}")
            continue
        tool = f"{r['tool_seq']:.1f} ({r['tool']})" if "tool" in r else "-"
        client = f"{r['client_seq']:.1f}" if "client_seq" in r else "-"
        lines.append(f"{name:<9}{tool:>22}{client:>16}{r['chain_seq']:>12.1f}"
                     f"{r['chain_concurrent']:>12.1f}")
    lines.append("chain = built-in checks plus that daemon; the builtin row is the built-in "
                 "checks alone.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    async def go(reactor: Any) -> None:
        results = await run(reactor, args)
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
