"""Doors closed, errors that say what to do: each test plays an adversarial user against one
promise (every _target_ checked, the labelling page's doors, the current directory's
plugins, errors naming the file and the fix, the same seed the first time too). The
promises that nothing is lost are in test_edges.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import cli, deterministic_rows, wait_for

from rlhf.core.run import rundir

TINY = ["train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=4", "eval.every=100"]


# ---------------------------------------------------------------------------- 7. every _target_ is checked
# (config files handed around: the adversary table of tests/config_files.yaml, tests/test_config_files.py)


def test_a_prepare_command_takes_overrides_only():
    from rlhf.apps.sweep import Prepare

    Prepare({"pairs": ["rlhf-make-pairs", "data.n_train=10", "+x=1", "~y", "pairs.out={sweep_dir}/p.jsonl"]})
    for flag in ("--experimental-rerun=x.pickle", "-cp", "--config-dir=/tmp"):
        with pytest.raises(ValueError, match="is not an override"):
            Prepare({"pairs": ["rlhf-make-pairs", flag]})


# ---------------------------------------------------------------------------- 8. the labelling page's doors


class _Session:
    """Enough of a labelling session for the page: one pair, never answered."""

    def current(self):
        from rlhf.apps.label import Pair

        return Pair(0, "The movie", "was good .", "was bad .")

    def progress(self):
        return {"answered": 0, "total": 1, "preferred": 0, "ties": 0, "skips": 0}

    def answer(self, index, choice):
        return True

    def agreement(self):
        return None


def _request(port: int, path: str = "/api/pair", host: str | None = None, origin: str | None = None) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Host": host or f"127.0.0.1:{port}", **({"Origin": origin} if origin else {})}
    conn.request("GET", path, headers=headers)
    return conn.getresponse().status


def test_the_labelling_page_answers_only_to_its_own_host_and_an_idle_client_does_not_stall_it(tmp_path, monkeypatch):
    from rlhf.apps.label_web import make_app, serve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "secret.txt").write_text("do not serve")
    app = make_app(_Session(), "out.jsonl", "next", lambda a: "")
    ports = []
    threading.Thread(target=serve, args=(app, "127.0.0.1", 0, False, lambda url: ports.append(int(url.rsplit(":", 1)[1][:-1]))),
                     daemon=True).start()
    wait_for(lambda: ports, 10, "the server")
    port = ports[0]
    idle = socket.create_connection(("127.0.0.1", port))  # connects, says nothing
    try:
        t0 = time.time()
        assert _request(port) == 200 and time.time() - t0 < 3
        assert _request(port, host=f"localhost:{port}") == 200
        assert _request(port, host=f"evil.example:{port}") == 403  # DNS rebinding
        assert _request(port, origin="http://evil.example") == 403  # another site's page
        assert _request(port, path="/static/secret.txt") == 404
    finally:
        idle.close()


def test_a_slow_or_huge_post_stalls_no_one_and_a_huge_one_is_refused(tmp_path, monkeypatch):
    """A client that sends a POST's headers and part of its body holds only its own thread (the
    body is read before the lock); a 10 MB answer is refused with 413, not read."""
    import http.client

    from rlhf.apps.label_web import make_app, serve

    monkeypatch.chdir(tmp_path)
    app = make_app(_Session(), "out.jsonl", "next", lambda a: "")
    ports = []
    threading.Thread(target=serve, args=(app, "127.0.0.1", 0, False, lambda url: ports.append(int(url.rsplit(":", 1)[1][:-1]))),
                     daemon=True).start()
    wait_for(lambda: ports, 10, "the server")
    port = ports[0]
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(f"POST /api/answer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100\r\n\r\n{\"index\": 0, ".encode())  # 14 of 100 bytes, then silence
    try:
        time.sleep(0.3)
        t0 = time.time()
        assert _request(port) == 200 and time.time() - t0 < 3  # not stalled behind the slow POST
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = b'{"index": 0, "choice": "left", "pad": "' + b"x" * (10 * 2**20) + b'"}'
        try:
            conn.request("POST", "/api/answer", body=body, headers={"Host": f"127.0.0.1:{port}",
                                                                    "Content-Type": "application/json"})
            status = conn.getresponse().status
        except (BrokenPipeError, ConnectionResetError):  # refused before the body was all sent
            status = 413
        assert status == 413
        assert _request(port) == 200  # and still serving
    finally:
        slow.close()


def test_one_owner_per_preference_file_whatever_path_names_it(tmp_path):
    """A second labelling session on the same file through a symlink or a hard link is refused."""
    out = tmp_path / "prefs.jsonl"
    out.write_text("")
    (tmp_path / "link.jsonl").symlink_to(out)
    (tmp_path / "sub").mkdir()
    os.link(out, tmp_path / "sub" / "hard.jsonl")
    code = (f"from rlhf.apps.label import PreferenceFile; from pathlib import Path; import time; "
            f"f = PreferenceFile(Path({str(out)!r}), lock=True); print('locked', flush=True); time.sleep(60)")
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        from rlhf.apps.label import PreferenceFile
        from rlhf.core.run.rundir import RunDirBusy

        for other in (tmp_path / "link.jsonl", tmp_path / "sub" / "hard.jsonl"):
            with pytest.raises(RunDirBusy, match="is in use by another process"):
                PreferenceFile(other, lock=True)
    finally:
        first.kill()


def test_one_labelling_process_per_preference_file(tmp_path, embedded_dir):
    out = tmp_path / "prefs.jsonl"
    code = (f"from rlhf.apps.label import PreferenceFile; from pathlib import Path; import time; "
            f"f = PreferenceFile(Path({str(out)!r})); f.lock(); print('locked', flush=True); time.sleep(60)")
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        r = cli("rlhf-label", f"label.out={out}", "label.mode=terminal", cwd=tmp_path, timeout=120)
        assert r.returncode != 0
        assert f"preference file {out} is in use by another process (pid {first.pid} on" in r.stderr, r.stderr[-2000:]
    finally:
        first.kill()


# ---------------------------------------------------------------------------- 9. the current directory's plugins


def test_a_plugins_folder_in_the_current_directory_does_not_replace_the_builtins(tmp_path):
    (tmp_path / "rlhf_plugins").mkdir()
    (tmp_path / "rlhf_plugins" / "__init__.py").write_text("raise SystemExit('the wrong rlhf_plugins was imported')\n")
    r = subprocess.run([sys.executable, "-m", "rlhf.apps.plugins_cli", "optimizer"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ppo  (rlhf_plugins.optimizers.ppo.PPO, builtin)" in r.stdout


# ---------------------------------------------------------------------------- 11. errors that name the file and the fix


BAD_INPUT_FILES = {
    "empty.txt": b"",
    "latin1.txt": b"caf\xe9 au lait\n",  # not UTF-8
    "list.jsonl": b'[1, 2]\n"a string"\n',  # JSON, but not objects
    "usr.jsonl": b'{"text": [{"role": "usr", "content": "hi"}]}\n' * 80,  # a role no template knows
    "weights.bin": b"\x00" * 16,  # a regular file where a model directory goes
}
BAD_INPUTS = [  # (command and arguments, what its one line must say)
    (["rlhf-make-pairs", "pairs.samples=1"], "pairs.samples=1 (must be at least 2)"),
    (["rlhf-make-pairs", "data.prompts=empty.txt"], "holds no non-empty prompt"),
    (["rlhf-make-pairs", "data.prompts=latin1.txt"], "not UTF-8 text"),
    (["rlhf-label", "label.mode=terminal", "data.prompts=list.jsonl"], "row 0 is a JSON list, not an object"),
    (["rlhf-label", "label.mode=terminal", "data.prompts=latin1.txt"], "not UTF-8 text"),
    (["rlhf-train-rm", "data.pairs=list.jsonl"], "row 0 is a JSON list, not an object"),
    (["rlhf-train", "data.prompts=list.jsonl"], "row 0 is a JSON list, not an object"),
    (["rlhf-train", "data.prompts=usr.jsonl", "data.text_field=text"], "message 0 has role 'usr'"),
    (["rlhf-train", "policy.path=weights.bin"], "weights.bin is a file; a model is a directory"),
    (["rlhf-train", "sampler.max_new_tokens=100000"], "a query of up to 7 tokens plus sampler.max_new_tokens=100000 is more"),
    (["rlhf-generate", "./no/such/run", "hello"], "no such run or model directory: no/such/run"),
]


def test_every_command_refuses_bad_input_in_one_line_leaving_no_run_behind(tmp_path, embedded_dir):
    """The same bad inputs give the same kind of answer from every command: one line naming the
    problem (no traceback), a non-zero exit, and no run directory left behind."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(i: int) -> str | None:
        (command, *args), message = BAD_INPUTS[i]
        cwd = tmp_path / str(i)
        cwd.mkdir()
        for name, data in BAD_INPUT_FILES.items():
            (cwd / name).write_bytes(data)
        r = cli(command, *args, cwd=cwd, timeout=300)
        lines = [x for x in r.stderr.strip().splitlines() if not x.startswith(("UserWarning", "  "))]
        runs = [p.parent for p in cwd.rglob("metrics.jsonl")] + [p for p in cwd.glob("outputs/*/*") if any(p.iterdir())]
        ok = r.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"{command}: ") and message in lines[0]
        return None if ok and not runs else f"{command} {args}: rc {r.returncode}, runs {runs}, stderr {r.stderr[-1500:]!r}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(attempt, range(len(BAD_INPUTS))) if f]
    assert not failures, "\n".join(failures)


def test_bad_prompt_files_are_named_with_the_line_and_the_fix(tmp_path):
    from rlhf.contracts.schema import DataConfig
    from rlhf.core.rollout.data import load_prompts

    def err(name: str, data: bytes, **kw) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load_prompts(DataConfig(prompts=str(path), n_eval=1, **kw))
        return str(e.value)

    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes("first prompt\nsecond prompt\n".encode("utf-16"))
    assert load_prompts(DataConfig(prompts=str(utf16), n_eval=1)) == (["second prompt"], ["first prompt"])
    assert "bin.txt: not UTF-8 text (byte 1 is b'\\x9c'" in err("bin.txt", b"x\x9c\x00\xffzz")
    assert "bad.jsonl: line 3 is not JSON" in err("bad.jsonl", b'{"text": "a"}\n\n{"text": \n{"text": "c"}\n')
    assert "data.prompts=" in err("p.csv", b"text\nhello\n") and ".csv files are not read; use .txt" in err("p.csv", b"x")
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(ValueError, match=r"data.prompts=.*d.txt is a directory"):
        load_prompts(DataConfig(prompts=str(tmp_path / "d.txt"), n_eval=1))
    with pytest.raises(ValueError, match=r"prompt 1 \(' '\) has no tokens after tokenisation"):
        from rlhf.core.rollout.data import tokenize_prompts

        class Tok:
            def __call__(self, texts, **kw):
                return {"input_ids": [[1] if t.strip() else [] for t in texts]}

        tokenize_prompts(Tok(), ["a", " "])


def test_settings_that_cannot_work_here_are_refused_in_one_line_before_any_model_loads(tmp_path):
    home = tmp_path / "cache"
    cases = [
        (["device=cuda"], "device=cuda: no CUDA device is visible here"),
        (["optimizer.beta=-0.1"], "rlhf-train: ppo: out of range: optimizer.beta=-0.1 (must be >= 0)"),
    ]
    for args, message in cases:
        r = cli("rlhf-train", *args, cwd=tmp_path, env={"RLHF_HOME": str(home)}, timeout=120)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
        assert not (tmp_path / "outputs").exists()  # no run directory left behind
        assert not home.exists() or not any(home.iterdir())


def test_an_rlhf_plugins_module_is_found_beside_you_or_named(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "from dataclasses import dataclass\nfrom rlhf.contracts.registry import register\n\n"
        "@register('reward', 'mine')\nclass Mine:\n    @dataclass\n    class Config:\n        x: int = 1  # x\n"
        "    def __init__(self, cfg):\n        self.cfg = cfg\n    def score(self, q, r):\n        return [0.0] * len(r)\n")
    r = cli("rlhf-plugins", "reward", cwd=tmp_path, env={"RLHF_PLUGINS": "my_rewards", "PYTHONPATH": None})
    assert r.returncode == 0 and "mine  (my_rewards.Mine, $RLHF_PLUGINS)" in r.stdout, r.stderr[-2000:]
    r = cli("rlhf-plugins", "reward", cwd=tmp_path, env={"RLHF_PLUGINS": "my_rewardz", "PYTHONPATH": None})
    assert r.returncode != 0
    assert "RLHF_PLUGINS names 'my_rewardz', which is not importable: no my_rewardz.py" in r.stderr


def test_offline_a_hub_name_fails_at_once_saying_how_to_use_a_local_copy(tmp_path):
    t0 = time.time()
    r = cli("rlhf-train", "policy=gpt2", "train.steps=1", cwd=tmp_path,
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 60
    assert "policy.path='gpt2' is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set" in r.stderr
    assert "--local-dir" in r.stderr and len(r.stderr) < 4000


# ---------------------------------------------------------------------------- 12. the same seed, first time too


def test_the_run_that_builds_its_model_trains_as_every_later_run(tmp_path):
    args = ["+experiment=toy_bandit", "train.steps=3", "train.batch_size=8", "eval.every=100", "checkpoint.every=0"]
    env = {"RLHF_HOME": str(tmp_path / "fresh")}  # the toy policy is built by the first run, in-process
    rows = []
    for name in ("first", "second"):
        run = tmp_path / name
        assert cli("rlhf-train", *args, f"hydra.run.dir={run}", cwd=tmp_path, env=env).returncode == 0
        rows.append(deterministic_rows(run / rundir.METRICS))
    assert rows[0] == rows[1]


def test_building_the_embedded_default_leaves_the_random_state_alone():
    import random

    import numpy as np

    from rlhf.embedded.build import own_random_state

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with own_random_state():
        torch.rand(100), random.random(), np.random.rand(5)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]




def test_the_labelling_page_answers_a_bad_body_with_400_not_500():
    from rlhf.apps.label_web import make_app

    app = make_app(_Session(), "out.jsonl", "next", lambda a: "")
    app.config["hosts"] = {"localhost"}
    client = app.test_client()
    headers = {"Host": "localhost", "Content-Type": "application/json"}
    for body in (b"[" * 20000 + b"]" * 20000, b'{"index": true, "choice": "left"}', b"not json", b'{"index": 0}'):
        assert client.post("/api/answer", data=body, headers=headers).status_code == 400, body[:40]
    assert client.post("/api/answer", data=b'{"index": 0, "choice": "left"}', headers=headers).status_code == 200


def test_commands_that_read_runs_name_a_missing_or_mistyped_one_in_one_line(tmp_path, embedded_dir):
    (tmp_path / "outputs" / "policy").mkdir(parents=True)
    r = cli("rlhf-compare", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip() == f"rlhf-compare: no such directory {tmp_path / 'nowhere'}", r.stderr
    r = cli("rlhf-generate", "outputs/polcy", "hello", cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no such run or model directory: outputs/polcy" in r.stderr and "did you mean outputs/policy?" in r.stderr
    assert "huggingface-cli download" not in r.stderr


def test_a_command_without_a_run_directory_leaves_no_log_where_you_run(tmp_path, embedded_dir):
    r = cli("rlhf-make-pairs", "data.n_train=2", "pairs.out=p.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.jsonl.lock"]
