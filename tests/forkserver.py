"""A fork server for the CLI tests: one process imports torch, transformers and peft once
(the ~6 s every command spends before its first line of its own), then forks a child per
command. Each child is a real process that runs the console script's entry point with its
own argv, working directory, environment, stdin/stdout/stderr and exit status, exactly as the
installed script would; only the third-party imports come already done. The parent never
runs a torch operation, so nothing thread-related is inherited (fork after OpenMP work is
unsafe). rlhf itself is imported fresh in each child.

Protocol (one JSON object per line): requests on stdin {"id", "name", "argv", "cwd", "env",
"out", "err"}; replies on stdout {"id", "pid"} once forked and {"id", "rc"} when the child
ends (rc as subprocess reports it: the exit code, or minus the signal that ended it).
"""

from __future__ import annotations

import json
import os
import select
import sys


def _child(req: dict) -> None:
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[1:1] = extra  # where Python puts PYTHONPATH: after the script's directory
        fd_in = os.open(os.devnull, os.O_RDONLY)
        fd_out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fd_err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        sys.argv = list(req["argv"])
        from importlib.metadata import entry_points

        (ep,) = entry_points(group="console_scripts", name=req["name"])
        main = ep.load()
        try:
            code = main()
        except SystemExit as e:
            code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import DistilBertForSequenceClassification, GPT2LMHeadModel  # noqa: F401

    sys.path[0] = sys.argv[1]  # a console script's own directory, as for the installed script
    requests, replies = sys.stdin.fileno(), sys.stdout.fileno()
    pending, children = b"", {}

    def reply(obj: dict) -> None:
        os.write(replies, (json.dumps(obj) + "\n").encode())

    reply({"ready": True})
    while True:
        ready, _, _ = select.select([requests], [], [], 0.02)
        if ready:
            chunk = os.read(requests, 1 << 16)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:  # the child's stdin and stdout replace the server's pipes
                    _child(req)
                children[pid] = req["id"]
                reply({"id": req["id"], "pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
