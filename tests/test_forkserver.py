"""The fork server sweeps start their jobs from (rlhf/apps/forkserver.py): each child is a
process of its own, reported as subprocess reports one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).parent)


def fork_server(**kwargs):
    """A ForkServer, imported when used: a child that imports this file must not import rlhf.apps."""
    from rlhf.apps.forkserver import ForkServer

    return ForkServer(**kwargs)


def report(path: str) -> None:
    """In the child: what it is, as JSON."""
    Path(path).write_text(json.dumps({
        "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "marker": os.environ.get("FORKED_MARKER"),
        "session": os.getsid(0), "path0": sys.path[0], "torch": "torch" in sys.modules, "rlhf_apps": "rlhf.apps" in sys.modules,
        "sigint": str(signal.getsignal(signal.SIGINT))}))


def shout(code) -> None:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    raise SystemExit(code)


def interrupted() -> None:
    raise KeyboardInterrupt


def exits_later(path: str) -> None:
    """Leaves work for the interpreter's exit: an atexit handler and a non-daemon thread."""
    import atexit
    import threading
    import time

    atexit.register(lambda: Path(path).write_text(Path(path).read_text() + "atexit\n"))
    Path(path).write_text("")
    threading.Thread(target=lambda: (time.sleep(0.3), Path(path).write_text(Path(path).read_text() + "thread\n"))).start()
    print("out")
    print("err", file=sys.stderr)


@pytest.fixture(scope="module")
def server():
    s = fork_server(preload=("torch",)).start()
    yield s
    s.close()


def test_a_child_has_its_own_directory_environment_argv_and_session(server, tmp_path):
    out = tmp_path / "report.json"
    child = server.spawn("test_forkserver:report", [str(out)], argv=["job", "a"], cwd=tmp_path, path0=HERE,
                         env={**os.environ, "FORKED_MARKER": "yes"}, new_session=True)
    assert child.wait(60) == 0
    got = json.loads(out.read_text())
    assert got["pid"] == child.pid != os.getpid()
    assert (got["cwd"], got["argv"], got["marker"], got["path0"]) == (str(tmp_path), ["job", "a"], "yes", HERE)
    assert got["session"] == child.pid  # a session of its own: a terminal's Ctrl-C does not reach it
    assert got["torch"] and not got["rlhf_apps"]  # the preloaded library is there, the project is imported fresh
    assert "default_int_handler" in got["sigint"]  # Ctrl-C raises KeyboardInterrupt in it, as in any process


@pytest.mark.parametrize("code, rc", [(0, 0), (3, 3), ("a message", 1), (None, 0)])
def test_exit_status_and_streams_as_subprocess_reports_them(server, tmp_path, code, rc):
    out, err = tmp_path / "out", tmp_path / "err"
    child = server.spawn("test_forkserver:shout", [code], cwd=tmp_path, path0=HERE, stdout=str(out), stderr=str(err))
    assert child.wait(60) == rc and child.poll() == rc == child.returncode
    assert out.read_text() == "to stdout\n"
    assert err.read_text() == "to stderr\n" + ("a message\n" if code == "a message" else "")


def test_a_signal_is_reported_as_subprocess_does_and_wait_times_out(server, tmp_path):
    child = server.spawn("time:sleep", [60], cwd=tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    assert child.poll() is None
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL


def test_an_exception_in_the_child_is_printed_and_exits_1(server, tmp_path):
    err = tmp_path / "err"
    child = server.spawn("no_such_module_here:main", cwd=tmp_path, stderr=str(err))
    assert child.wait(60) == 1 and "ModuleNotFoundError: No module named 'no_such_module_here'" in err.read_text()


def test_the_server_ignores_interrupts_so_running_children_are_still_reported(tmp_path):
    s = fork_server(preload=()).start()
    try:
        child = s.spawn("time:sleep", [2], cwd=tmp_path, new_session=True)
        os.kill(s.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the sweep's process group
        os.kill(s.proc.pid, signal.SIGTERM)
        assert child.wait(60) == 0 and s.proc.poll() is None
    finally:
        s.close()
    assert s.proc is None


def test_children_outlive_a_closed_server(tmp_path):
    s = fork_server(preload=()).start()
    child = s.spawn("time:sleep", [1.5], cwd=tmp_path)
    s.close()
    os.kill(child.pid, 0)  # still running after the server ended
    assert child.wait(60) == 255  # its status went with the server; it is said to have ended when it has


def test_ctrl_c_ends_a_child_as_a_signal_and_its_exit_runs_as_pythons_does(server, tmp_path):
    err = tmp_path / "err"
    child = server.spawn("test_forkserver:interrupted", cwd=tmp_path, path0=HERE, stderr=str(err))
    assert child.wait(60) == -signal.SIGINT and "KeyboardInterrupt" in err.read_text()
    marks, both = tmp_path / "marks", tmp_path / "both"
    child = server.spawn("test_forkserver:exits_later", [str(marks)], cwd=tmp_path, path0=HERE, stdout=str(both),
                         stderr=str(both))
    assert child.wait(60) == 0
    assert marks.read_text() == "thread\natexit\n"  # the thread joined first, then the atexit handlers
    assert sorted(both.read_text().split()) == ["err", "out"]  # one file for both streams loses neither
