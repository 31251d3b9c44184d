"""One `mailcore` command run by the CLI zygote (tests/support/cli_zygote.py): run as a
script, `python cli_client.py SOCKET ARGS...`, in the place of `python -m mailcore.cli
ARGS...`, with the command's stdio, environment and cwd.

It hands the zygote its stdin, stdout and stderr with its argv, environment, cwd and
umask, and ends as the command's child ended (the same exit status, or killed by the same
signal). Killed itself, its connection closes and the zygote kills the child. A zygote that
cannot be reached makes it run the command itself (exec `python -m mailcore.cli`).
Standard library only: it costs a bare interpreter's start.
"""

import json
import os
import signal
import socket
import sys


def main() -> None:
    path, args = sys.argv[1], sys.argv[2:]
    umask = os.umask(0o077)
    os.umask(umask)
    request = {"args": args, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    except OSError:
        os.execv(sys.executable, [sys.executable, "-m", "mailcore.cli", *args])  # noqa: S606
    how, _, number = conn.recv(64).decode().partition(" ")
    if how == "signal":
        if int(number) != signal.SIGKILL:  # whose handler cannot be set, nor needs to be
            signal.signal(int(number), signal.SIG_DFL)
        os.kill(os.getpid(), int(number))
    os._exit(int(number) if how == "exit" else 70)  # 70: the zygote went away (EX_SOFTWARE)


if __name__ == "__main__":
    main()
