"""A process that has imported the `mailcore` CLI once and forks a child for each command
a test runs (tests.support.cli): run as a script, `python cli_zygote.py FD`, FD a listening
AF_UNIX SOCK_SEQPACKET socket its parent made.

Each connection (tests/support/cli_client.py, one per command) sends one message: the
command's argv, environment, cwd and umask as JSON, with its stdin, stdout and stderr
(SCM_RIGHTS). The child takes them as its 0, 1 and 2, closes every other descriptor, and
runs `mailcore.cli` as `python -m mailcore.cli` does; the end of this script is the end of
its program, so it exits as that command would (status, traceback, atexit, flush). The
zygote answers the connection with how the child ended, `exit N` or `signal N`, and kills
a child whose client went away first (a test's timeout killed it).

Only imports happen before the fork: no thread, no reactor (the command installs its own
after), no descriptor the child keeps. A module that cannot be imported here is imported
again by the child, which reports it as the command would.
"""

import sys

del sys.path[0]  # this script's directory (tests/support) is no package path of the CLI's

import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
from typing import Any  # noqa: E402

PRELOAD = ("mailcore.cli", "mailcore.startup", "mailcore.service", "mailcore.privileges",
           "mailcore.cli.billing", "mailcore.cli.domains", "mailcore.cli.jobs",
           "mailcore.cli.mailboxes", "mailcore.cli.oauth", "mailcore.cli.queue",
           "mailcore.cli.secrets", "mailcore.cli.users", "mailcore.cli.webhooks")


def preload() -> bool:
    """Import the CLI's modules. False when the imports wrote on stderr (a warning, say):
    a command's own imports would have written it on the command's stderr, where a test
    sees it, so the children then run the command in a fresh interpreter (exec) instead,
    and the zygote's log keeps what was written."""
    import importlib
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)
        try:
            for name in PRELOAD:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: S112 (the child imports it again and says why)
                    continue
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        written = said.read()
    os.write(2, written)
    if "twisted.internet.reactor" in sys.modules:  # would be shared by every child
        raise SystemExit("cli_zygote: a preloaded module installed the reactor")
    return not written


def serve(listener: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Fork a child per request until the parent goes (exit); in a child, return its
    request and descriptors."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    waiting: set[socket.socket] = set()  # accepted, request not read yet
    children: dict[int, socket.socket] = {}
    abandoned: set[int] = set()  # killed (their clients went), not reaped yet
    while True:
        watched = [c for pid, c in children.items() if pid not in abandoned]
        readable, _, _ = select.select(
            [listener, wake_r, sys.stdin, *waiting, *watched], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            for pid in children:  # the test process is gone: so are its commands
                os.kill(pid, signal.SIGKILL)
            os._exit(0)
        if wake_r in readable:
            os.read(wake_r, 4096)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid)
                abandoned.discard(pid)
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                how = f"signal {sig}" if sig else f"exit {os.WEXITSTATUS(status)}"
                try:
                    conn.send(how.encode())
                except OSError:
                    pass
                conn.close()
        for pid, conn in list(children.items()):
            if conn in readable and pid not in abandoned:  # its client went before it ended
                os.kill(pid, signal.SIGKILL)  # once: its connection stays readable
                abandoned.add(pid)
        if listener in readable:
            conn, _ = listener.accept()
            waiting.add(conn)
        for conn in [c for c in waiting if c in readable]:
            waiting.discard(conn)
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            if len(fds) != 3 or not message:
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                return json.loads(message), fds
            for fd in fds:
                os.close(fd)
            children[pid] = conn


def become(request: dict[str, Any], fds: list[int]) -> None:
    """Make this child the command's process: its descriptors, directory, umask,
    environment and sys.path[0] (`python -m` puts the cwd first)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path.insert(0, request["cwd"])
    sys.argv = ["-m", *request["args"]]


if __name__ == "__main__":
    _listener = socket.socket(fileno=int(sys.argv[1]))
    _quiet = preload()
    _request, _fds = serve(_listener)
    _listener.close()  # the child's copy; the zygote keeps listening
    become(_request, _fds)
    if not _quiet:  # as `python -m mailcore.cli` would be, imports and all
        _argv = [sys.executable, "-m", "mailcore.cli", *_request["args"]]
        os.execv(sys.executable, _argv)  # noqa: S606
    del _listener, _request, _fds, _quiet
    runpy.run_module("mailcore.cli", run_name="__main__", alter_sys=True)
