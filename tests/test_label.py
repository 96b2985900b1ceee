"""rlhf-label: a person's preferences, from a real browser and a real terminal, into training.

The page is driven in Debian's Chromium through Playwright (clicks and key presses); the
terminal mode through a pseudo-terminal (pexpect). Every test runs the installed command
as a subprocess on the embedded default.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, cli, compose

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
SMALL = ["data.n_train=40", "data.n_eval=4", "sampler.max_new_tokens=12", "threads=1"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Labeller:
    """rlhf-label label.mode=web as a subprocess, on a free port."""

    def __init__(self, tmp_path: Path, *args: str):
        self.proc = subprocess.Popen([str(BIN / "rlhf-label"), "label.port=0", *SMALL, *args], cwd=tmp_path,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = None
        for line in self.proc.stdout:
            m = re.search(r"label in your browser: (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        assert self.url, self.proc.stderr.read()[-3000:]

    def wait(self, timeout: float = 60) -> str:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err[-3000:]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def progress(page) -> str:
    return page.locator("#progress").inner_text()


@needs_chromium
@pytest.mark.slow
def test_page_records_clicks_and_keys_survives_a_closed_tab_and_trains_a_reward_model(tmp_path, browser, embedded_dir):
    out = tmp_path / "prefs.jsonl"
    lab = Labeller(tmp_path, "label.pairs=6", f"label.out={out}", "reward=sentiment", "label.who=tester")
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(lab.url)
        page.wait_for_function("document.querySelector('#progress').textContent === '0 / 6 answered'")
        shown = []

        def act(how: str, n: int) -> None:
            shown.append((page.locator("#left").inner_text(), page.locator("#right").inner_text()))
            if how == "click-right":
                page.click("#b-right")
            else:
                page.keyboard.press(how)
            page.wait_for_function(f"document.querySelector('#progress').textContent === '{n} / 6 answered'")

        act("ArrowLeft", 1)
        act("click-right", 2)
        page.keyboard.press("x")  # not a key of the page: a hint, nothing recorded
        assert 'unknown key "x"' in page.locator("#hint").inner_text()
        assert len(records(out)) == 2
        act("t", 3)
        page.screenshot(path=str(tmp_path / "asking.png"))
        page.close()  # the tab goes away mid-session; the server keeps the state on disk

        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(lab.url)
        page.wait_for_function("document.querySelector('#progress').textContent === '3 / 6 answered'")
        act("2", 4)
        act("s", 5)
        act("1", 6)
        page.wait_for_selector("#done:not([hidden])")
        page.wait_for_function("document.querySelector('#agreement').textContent.length > 0")
        agreement = page.locator("#agreement").inner_text()
        page.screenshot(path=str(tmp_path / "done.png"), full_page=True)
        for name in ("asking.png", "done.png"):  # kept for a look when RLHF_LABEL_SCREENSHOTS names a folder
            if os.environ.get("RLHF_LABEL_SCREENSHOTS"):
                shutil.copy(tmp_path / name, Path(os.environ["RLHF_LABEL_SCREENSHOTS"]) / name)
        assert "4 preferences, 1 ties, 1 skipped" in page.locator("#summary").inner_text()
        assert re.fullmatch(r"agreement: the reward source prefers your choice in \d of 4 pairs \(\d+%\)", agreement)
        lab.wait()  # the server stops by itself once everything is answered
    finally:
        lab.stop()

    rows = records(out)
    assert [r["index"] for r in rows] == list(range(6))  # each pair once, in order
    assert [r["label"] for r in rows] == ["preferred", "preferred", "tie", "preferred", "skip", "preferred"]
    picked = {0: "left", 1: "right", 3: "right", 5: "left"}
    for i, side in picked.items():
        left, right = shown[i]
        assert (rows[i]["chosen"], rows[i]["rejected"]) == ((left, right) if side == "left" else (right, left))
        assert rows[i]["shown"] == {"left": left, "right": right}
    assert all(r["who"] == "tester" and r["policy"] == "embedded" and "temperature" in r["sampler"] for r in rows)
    from PIL import Image

    assert Image.open(tmp_path / "done.png").size[0] == 1200

    # a restart with everything answered asks nothing
    r = cli("rlhf-label", "label.pairs=6", f"label.out={out}", *SMALL, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "answered already" in r.stdout, r.stderr[-2000:]
    assert len(records(out)) == 6

    # the person's answers train a reward model and a DPO policy
    r = cli("rlhf-train-rm", f"data.pairs={out}", "data.n_eval=1", "rm.steps=2", "rm.batch_size=2", "rm.normalize=false",
            "threads=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out pairwise accuracy" in r.stdout


@pytest.mark.slow
def test_terminal_mode_through_a_pty_stops_and_continues_without_asking_twice(tmp_path, embedded_dir):
    import pexpect

    out = tmp_path / "prefs.jsonl"
    argv = ["label.mode=terminal", "label.pairs=3", f"label.out={out}", *SMALL]
    child = pexpect.spawn(str(BIN / "rlhf-label"), argv, cwd=str(tmp_path), encoding="utf-8", timeout=120,
                          dimensions=(40, 120))
    child.expect(r"\[1/3\] prompt: ")
    child.expect("> ")
    child.sendline("1")
    child.expect(r"\[2/3\] prompt: ")
    child.expect("> ")
    child.sendline("x")
    child.expect("unknown answer 'x'")
    child.expect("> ")
    child.sendline("t")
    child.expect(r"\[3/3\] prompt: ")
    child.expect("> ")
    child.sendline("q")
    child.expect("stopped; 2 answers are in")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [(r["index"], r["label"]) for r in records(out)] == [(0, "preferred"), (1, "tie")]

    child = pexpect.spawn(str(BIN / "rlhf-label"), argv, cwd=str(tmp_path), encoding="utf-8", timeout=120)
    child.expect(r"\[3/3\] prompt: ")  # continues with the pair not yet answered
    child.expect("> ")
    child.sendline("2")
    child.expect("all 3 pairs answered: 2 preferences, 1 ties, 0 skipped")
    child.expect("rlhf-train-rm data.pairs=")
    child.expect(pexpect.EOF)
    child.close()
    assert [(r["index"], r["label"]) for r in records(out)] == [(0, "preferred"), (1, "tie"), (2, "preferred")]


def test_a_malformed_preference_file_is_refused_before_any_model_loads(tmp_path):
    out = tmp_path / "prefs.jsonl"
    out.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "label": "preferred", "index": 0}\n{"prompt": "a", "cho\n')
    r = cli("rlhf-label", f"label.out={out}", cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert f"{out}: line 2 is not JSON" in r.stderr and "label.out=<path>" in r.stderr
    from rlhf.apps.label import PreferenceFile, PreferenceFileError

    out.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')  # someone else's pair file
    with pytest.raises(PreferenceFileError, match="line 1 lacks label, index; it was not written by rlhf-label"):
        PreferenceFile(out)


def test_a_taken_port_is_named_with_the_fix(tmp_path, embedded_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("rlhf-label", f"label.port={port}", f"label.out={tmp_path / 'p.jsonl'}", *SMALL, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert f"cannot serve on 127.0.0.1:{port}" in r.stderr and "label.port=<n>" in r.stderr


@pytest.fixture
def app(tmp_path, embedded_dir):
    from rlhf.apps.label import agreement_line, build_session, next_steps
    from rlhf.apps.label_web import make_app

    out = str(tmp_path / "prefs.jsonl")
    cfg = compose("label.pairs=3", f"label.out={out}", *SMALL, config_name="label")
    return make_app(build_session(cfg), out, next_steps(out), agreement_line).test_client(), Path(out)


def test_api_refuses_bad_answers_and_ignores_a_second_answer_to_the_same_pair(app):
    client, out = app
    state = client.get("/api/pair").get_json()
    index = state["pair"]["index"]
    r = client.post("/api/answer", json={"index": index, "choice": "up"})
    assert r.status_code == 400 and "choice" in r.get_json()["error"]
    r = client.post("/api/answer", data="not json", content_type="application/json")
    assert r.status_code == 400
    assert not out.exists()
    assert client.post("/api/answer", json={"index": index, "choice": "left"}).get_json()["progress"]["answered"] == 1
    again = client.post("/api/answer", json={"index": index, "choice": "right"}).get_json()  # a second tab, late
    assert again["progress"]["answered"] == 1 and again["pair"]["index"] == index + 1
    assert [r["index"] for r in records(out)] == [index]
    a = client.get("/api/agreement").get_json()
    assert a["text"].startswith("agreement: no reward source given")


def test_tie_and_skip_rows_are_left_out_of_training_pairs(tmp_path):
    from rlhf.core.rollout.pairs import load_pairs

    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad", "label": lab, "index": i}
            for i, lab in enumerate(["preferred", "tie", "skip", "preferred", "preferred"])]
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(f"data.pairs={f}", "data.n_eval=1").data
    train, held_out = load_pairs(cfg)
    assert [p.prompt for p in held_out + train] == ["p0", "p3", "p4"]


def test_a_run_directory_is_loaded_as_its_trained_policy(tmp_path, embedded_dir):
    import torch
    from safetensors.torch import load_file

    from rlhf.contracts.schema import PolicyConfig
    from rlhf.core.model.policy import Policy

    r = cli("rlhf-train", "optimizer=reinforce", "train.steps=2", "train.batch_size=4", "data.n_eval=2",
            "sampler.max_new_tokens=6", "threads=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = next((tmp_path / "outputs").rglob("summary.json")).parent
    policy = Policy.load_trained(PolicyConfig(path=str(run)), torch.device("cpu"))
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    loaded = {n: p for n, p in policy.model.named_parameters() if "lora_B" in n}
    assert saved and loaded and any(v.abs().max() > 0 for v in saved.values())  # trained, not the zero init
    for name, tensor in saved.items():
        match = [p for n, p in loaded.items() if n.startswith(name.removesuffix(".weight"))]
        if "lora_B" in name:
            assert len(match) == 1 and torch.equal(match[0].detach(), tensor)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
