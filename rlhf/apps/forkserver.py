"""A fork server: one process imports torch, transformers and peft once (the ~5 s every
fresh Python process that trains spends before its first line of its own), then forks a
child per request. A sweep's jobs start from it (`apps/launcher.py`), and so do the test
suite's commands. Each child is a real process of its own: its own pid, working directory,
environment, standard streams, session if asked, and exit status (as `subprocess` reports
it: the exit code, or minus the signal that ended it). Only the third-party imports come
already done; rlhf and the plugins are imported fresh in each child.

The server never runs a torch operation (fork after OpenMP work is unsafe) and ignores
SIGINT and SIGTERM, so a Ctrl-C to the terminal's process group cannot take the exit
statuses of running children with it; it ends when its parent closes the request pipe.
Children it has forked run on if it ends (as `Popen` children outlive their parent).

Protocol, one JSON object a line, on two pipes of their own (the server's standard streams
are its parent's, and a child's unless the request names files): requests {"id", "target"
("module:function"), "args", "argv", "cwd", "env", "path0", "stdin", "stdout", "stderr"
(file paths, or null: /dev/null for stdin, the server's own for the others),
"new_session"}; replies {"ready": true} once, then {"id", "pid"} when forked and {"id",
"rc"} when the child has ended.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

PRELOAD = ("torch", "transformers", "peft", "hydra", "omegaconf")


class ForkServerError(RuntimeError):
    """The fork server could not start or stopped answering; callers fall back to Popen."""


# ------------------------------------------------------------------ in the server's process


def _child(req: dict, pipes: tuple[int, int]) -> None:
    code: Any = 1
    try:
        for fd in pipes:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if req.get("new_session"):
            os.setsid()
        os.chdir(req["cwd"])
        if req.get("env") is not None:
            os.environ.clear()
            os.environ.update(req["env"])
            known = set(sys.path)  # where Python puts PYTHONPATH: after the script's directory
            sys.path[1:1] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in known]
        if req.get("path0") is not None:
            sys.path[0] = req["path0"]
        for target, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                    (2, "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            path = req.get(name) or (os.devnull if target == 0 else None)
            if target == 2 and path is not None and path == req.get("stdout"):
                os.dup2(1, 2)  # one file for both: one open file, one offset, as 2>&1
            elif path is not None:
                fd = os.open(path, flags, 0o600)
                os.dup2(fd, target)
                os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        sys.argv = list(req.get("argv") or [sys.executable])
        module, _, attr = req["target"].partition(":")
        function = importlib.import_module(module)
        for part in attr.split("."):
            function = getattr(function, part)
        try:
            code = function(*req.get("args", []))
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:  # as Python itself ends on one: killed by SIGINT (rc -2)
            import traceback

            traceback.print_exc()
            code = -signal.SIGINT
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
    try:  # what a normal interpreter exit does: wait for non-daemon threads, run atexit handlers
        import atexit

        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def serve(requests: int, replies: int, preload: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in preload:
        importlib.import_module(name)
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
                if pid == 0:
                    _child(req, (requests, replies))
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


# ------------------------------------------------------------------ in the parent's process


class Forked:
    """A child of the fork server, used as a `subprocess.Popen` is: pid, poll, wait,
    send_signal, terminate, kill, returncode."""

    def __init__(self, server: "ForkServer", pid: int, done: threading.Event, slot: dict):
        self.server, self.pid, self._done, self._slot = server, pid, done, slot
        self.args = slot.get("argv")

    @property
    def returncode(self) -> int | None:
        return self._slot.get("rc")

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The parent's side: the server is started on first use; calls from several threads at
    once are fine. `close()` (or the parent's exit) ends the server, not its children."""

    def __init__(self, preload: Sequence[str] = PRELOAD, env: dict | None = None):
        self.preload, self.env = tuple(preload), env
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.slots: dict[int, dict] = {}
        self.next_id = 0

    @staticmethod
    def available() -> bool:
        return sys.platform.startswith("linux") and hasattr(os, "fork")

    def start(self) -> "ForkServer":
        """Start the server now (it is otherwise started by the first spawn)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
        return self

    def _start(self) -> None:
        if not self.available():
            raise ForkServerError(f"no fork server on {sys.platform}")
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        # this file run as it is, not imported: the server holds no module of the project's (each child
        # imports the commands fresh, so an edit between two jobs is seen)
        code = f"import runpy; runpy.run_path({__file__!r})['serve']({req_r}, {rep_w}, {list(self.preload)!r})"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, pass_fds=(req_r, rep_w),
                                         env=self.env)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.requests, replies = os.fdopen(req_w, "wb"), os.fdopen(rep_r, "rb")
        line = replies.readline()
        if not line or json.loads(line) != {"ready": True}:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            raise ForkServerError("the fork server did not start")
        threading.Thread(target=self._read, args=(replies, self.proc), daemon=True).start()

    def _read(self, replies, proc: subprocess.Popen) -> None:
        for line in replies:
            msg = json.loads(line)
            with self.lock:
                slot = self.slots[msg["id"]]
            slot.update({k: v for k, v in msg.items() if k != "id"})
            slot["event"].set()
            if "rc" in msg:
                slot["done"].set()
        with self.lock:  # this server is gone: the children it forked are on their own
            mine = [s for s in self.slots.values() if s.get("server") is proc and "rc" not in s]
        for slot in mine:
            if "pid" in slot:
                threading.Thread(target=_watch_orphan, args=(slot,), daemon=True).start()
            else:  # never forked: spawn says so
                slot["event"].set()

    def spawn(self, target: str, args: Sequence = (), *, argv: Sequence[str] | None = None, cwd: str | os.PathLike = ".",
              env: dict | None = None, path0: str | None = None, stdin: str | None = None, stdout: str | None = None,
              stderr: str | None = None, new_session: bool = False) -> Forked:
        """Fork a child that calls `target(*args)` ("module:function") and exits with what it
        returns or raises (SystemExit as Python's own exit does)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.next_id += 1
            slot = self.slots[self.next_id] = {"event": threading.Event(), "done": threading.Event(), "argv": argv,
                                               "server": self.proc}
            request = {"id": self.next_id, "target": target, "args": list(args), "argv": list(argv) if argv else None,
                       "cwd": str(os.path.abspath(cwd)), "env": env if env is None else dict(env), "path0": path0,
                       "stdin": stdin, "stdout": stdout, "stderr": stderr, "new_session": new_session}
            try:
                self.requests.write((json.dumps(request) + "\n").encode())
                self.requests.flush()
            except OSError as e:
                raise ForkServerError(f"the fork server stopped answering: {e}") from e
        if not slot["event"].wait(60) or "pid" not in slot:
            raise ForkServerError("the fork server did not fork the child")
        return Forked(self, slot["pid"], slot["done"], slot)  # (slot["server"] keeps which server forked it)

    def close(self) -> None:
        with self.lock:
            if self.proc is not None:
                self.requests.close()
                self.proc.wait()
                self.proc = None


def _watch_orphan(slot: dict) -> None:
    """The server ended before this child: its exit status is lost; say it ended when it has."""
    pid = slot.get("pid")
    while pid is not None:
        try:  # gone, or a zombie nobody reaps (the state after the name in /proc/<pid>/stat)
            if open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] in "ZX":
                break
        except (OSError, IndexError):
            break
        time.sleep(0.1)
    slot.setdefault("rc", 255)
    slot["done"].set()
