"""Nothing lost at the edges: each test plays an adversarial user against one promise (real
processes, real signals, real files). The doors closed and the errors that say what to do
are in test_doors.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli, launch, wait_for

from rlhf.core.run import checkpoint, rundir

TINY = ["train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=4", "eval.every=100"]


def start(args: list[str], cwd: Path, env: dict | None = None):
    return launch("rlhf-train", *args, cwd=cwd, env=env)


def holder(run: Path) -> dict:
    """The owner's record in the run's lock file; {} when the last owner released it."""
    try:
        record = json.loads((run / rundir.LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return {} if record.get("released") else record


def logged_steps(run: Path) -> list[int]:
    path = run / rundir.METRICS
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")] if path.exists() else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedded_dir) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; copy it before damaging it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    r = cli("rlhf-train", f"hydra.run.dir={run}", "train.steps=4", "checkpoint.every=2", "eval.every=2", *TINY[:-1],
            cwd=run.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def copy_of(run: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(run, where / "run")
    return where / "run"


# ---------------------------------------------------------------------------- 1. one owner per run directory


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path, embedded_dir):
    procs = [start(["train.steps=1", "threads=1", *TINY], tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = sorted(p.parent for p in (tmp_path / "outputs").rglob(rundir.SUMMARY))
    assert len(runs) == 2
    for run, proc in zip(sorted(runs, key=lambda r: int(r.name.rsplit("-", 1)[1])), sorted(procs, key=lambda p: p.pid)):
        assert run.name.endswith(f"-{proc.pid}")  # <time>-<pid>: readable, and apart
        assert (run / rundir.CONFIG).is_file() and not holder(run)  # released at the end


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, embedded_dir):
    run = tmp_path / "run"
    first = start([f"hydra.run.dir={run}", "train.steps=2000", "checkpoint.every=2", *TINY], tmp_path)
    try:
        wait_for(lambda: checkpoint.complete(run) and holder(run), what="the first run's first checkpoint")
        pid = holder(run)["pid"]
        assert pid == first.pid
        for second in ([f"hydra.run.dir={run}", "train.steps=2", *TINY], [f"resume={run}"]):
            r = cli("rlhf-train", *second, cwd=tmp_path, timeout=300)
            assert r.returncode != 0
            assert f"run directory {run} is in use by another process (pid {pid} on " in r.stderr, r.stderr[-2000:]
            assert "Traceback" not in r.stderr
        config = (run / rundir.CONFIG).read_text()
        assert "train.steps=2\n" not in (run / rundir.OVERRIDES).read_text() and config == (run / rundir.CONFIG).read_text()
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert holder(run)["pid"] == pid  # the dead owner's record is still there ...
    r = cli("rlhf-train", f"resume={run}", "train.steps=6", cwd=tmp_path, timeout=300)  # ... and is taken over
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"its last owner (pid {pid} on" in r.stderr and "taken over" in r.stderr
    assert json.loads((run / rundir.SUMMARY).read_text())["steps"] == 6 and not holder(run)


def test_a_new_run_into_a_finished_runs_directory_is_refused_and_loses_nothing(finished, tmp_path):
    run = finished
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != rundir.LOCK}
    r = cli("rlhf-train", f"hydra.run.dir={run}", "train.steps=3", "seed=5", "checkpoint.every=1", *TINY, cwd=tmp_path)
    assert r.returncode != 0
    assert f"run directory {run} already holds another run (" in r.stderr and f"rlhf-train resume={run}" in r.stderr
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != rundir.LOCK}
    assert after == before  # its checkpoints, record and log untouched


# ---------------------------------------------------------------------------- 2. one killed job does not end a sweep


def test_a_sigkilled_job_of_a_parallel_sweep_fails_alone(tmp_path, embedded_dir):
    sweep = tmp_path / "sw"
    proc = start(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "seed=0,1,2",
                  "train.steps=60", "checkpoint.every=1000", *TINY], tmp_path)
    try:
        wait_for(lambda: all(logged_steps(sweep / str(i)) for i in (0, 1)), what="two jobs training")
        victim = holder(sweep / "0")["pid"]
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "sweep " in out and ": 3 runs, 2 completed, 1 failed" in out, out[-2000:] + err[-2000:]
    assert "FAILED 0: seed=0" in out and "killed by SIGKILL" in out
    assert "killed by SIGKILL" in (sweep / "0" / rundir.ERROR).read_text()
    for i in (1, 2):  # the job beside it and the one not yet started both ran to the end
        assert json.loads((sweep / str(i) / rundir.SUMMARY).read_text())["steps"] == 60


def test_ctrl_c_to_a_parallel_sweep_stops_every_job_at_a_checkpoint_and_starts_no_other(tmp_path, embedded_dir):
    sweep = tmp_path / "sw"
    proc = start(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "seed=0,1,2",
                  "train.steps=3000", "checkpoint.every=1000", *TINY], tmp_path)
    try:
        wait_for(lambda: all(len(logged_steps(sweep / str(i))) > 2 for i in (0, 1)), what="two jobs training")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ": 3 runs, 0 completed, 3 failed" in out, out[-2000:] + err[-2000:]
    for i in (0, 1):  # each stopped once, at a step, with a checkpoint
        said = (sweep / str(i) / rundir.ERROR).read_text()
        assert "stopped by SIGINT; `rlhf-train resume=<its directory>` continues it" in said
        assert len(checkpoint.complete(sweep / str(i))) == 1
    assert "not started: the sweep was stopped by SIGINT" in (sweep / "2" / rundir.ERROR).read_text()


# ---------------------------------------------------------------------------- 3. a failed resume keeps the record


def test_a_resume_that_fails_leaves_the_runs_record_and_names_the_setting(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    record = {name: (run / rundir.HYDRA / name).read_bytes() for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    r = cli("rlhf-train", f"resume={run}", "resume_force=true", "policy.lora.r=16", cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "policy.lora.r says what its checkpoint holds" in r.stderr, r.stderr[-2000:]
    assert {name: (run / rundir.HYDRA / name).read_bytes() for name in record} == record
    assert not (run / rundir.ERROR).exists()
    # every checkpoint damaged: one line, nothing of the run rewritten
    damaged = copy_of(finished, tmp_path / "damaged")
    for state in damaged.glob("checkpoints/*/state.pt"):
        state.write_bytes(state.read_bytes()[:-1] + b"x")
    r = cli("rlhf-train", f"resume={damaged}", cwd=tmp_path)
    said = [x for x in r.stderr.strip().splitlines() if not x.startswith("UserWarning")]
    assert r.returncode != 0 and said == [f"rlhf-train: no checkpoint of {damaged} could be loaded (see the warnings "
                                          "above); start a new run"], r.stderr[-2000:]
    assert not (damaged / rundir.ERROR).exists()
    r = cli("rlhf-train", f"resume={run}", "train.steps=6", cwd=tmp_path)  # the plain resume still works
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / rundir.SUMMARY).read_text())["resumed_from_step"] == 4


# ---------------------------------------------------------------------------- 4. metrics.jsonl survives crashes


@pytest.mark.parametrize("damage", ["short", "half_line", "deleted"])
def test_a_damaged_metrics_log_is_repaired_on_resume_and_said(damage, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    newest = checkpoint.complete(run)[-1]
    assert newest.name == "step_000004"
    offset = torch.load(newest / checkpoint.STATE, weights_only=True)["metrics_offset"]
    log = run / rundir.METRICS
    data = log.read_bytes()
    assert len(data) == offset
    if damage == "short":  # the last rows never reached the disk
        log.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1])
    elif damage == "half_line":  # a power cut in the middle of a row
        log.write_bytes(data[: len(data) - 7])
    else:
        log.unlink()
    r = cli("rlhf-train", f"resume={run}", "train.steps=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    said = {"short": "fewer than the", "half_line": "fewer than the", "deleted": "was missing"}[damage]
    assert said in r.stderr, r.stderr[-2000:]
    text = log.read_bytes()
    assert b"\x00" not in text and all(json.loads(line) for line in text.splitlines())
    assert [json.loads(x)["step"] for x in text.splitlines()][-1] == 6
    r = cli("rlhf-compare", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------- 5. files readers trust are atomic


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    rundir.write_atomic(path, '{"old": 1}\n')

    def crash(*args):
        raise OSError("killed here")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        rundir.write_atomic(path, '{"new": 2}\n')
    assert json.loads(path.read_text()) == {"old": 1}


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, embedded_dir) -> Path:
    """Two finished one-step runs of a sweep, one with a `$` in a config value; copy before damaging."""
    sweep = tmp_path_factory.mktemp("sweep") / "sw"
    r = cli("rlhf-train", "-m", f"hydra.sweep.dir={sweep}", "seed=0,1", "train.steps=1", "+tag=cost$5", *TINY,
            cwd=sweep.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return sweep


def test_a_zero_byte_summary_is_a_failed_job_and_compare_reports_the_rest(small_sweep, tmp_path):
    import shutil

    sweep = tmp_path / "sw"
    shutil.copytree(small_sweep, sweep)
    (sweep / "0" / rundir.SUMMARY).write_text("")  # what a kill in the middle of a plain write leaves
    from rlhf.apps import sweep as sweep_app

    assert sweep_app.report(sweep) == 1
    r = cli("rlhf-compare", str(sweep), cwd=tmp_path)
    assert r.returncode == 0 and "1 runs" in r.stdout and f"{sweep / '0'} left out" in r.stderr


def test_compare_survives_a_run_without_a_log_and_a_dollar_in_a_config_value(small_sweep, tmp_path):
    import shutil

    sweep = tmp_path / "sw"
    shutil.copytree(small_sweep, sweep)
    (sweep / "0" / rundir.METRICS).unlink()
    r = cli("rlhf-compare", str(sweep), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 runs" in r.stdout and f"{sweep / '0'} has no metrics.jsonl" in r.stderr
    assert (sweep / "report.html").is_file() and (sweep / "frontier.png").is_file()


# ---------------------------------------------------------------------------- 6. checkpoints verified by content


def test_a_checkpoint_damaged_in_place_is_named_and_the_one_before_it_used(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    weights = run / checkpoint.DIR / "step_000004" / checkpoint.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the right size, a header that is not safetensors'
    weights.write_bytes(bytes(data))
    r = cli("rlhf-train", f"resume={run}", "train.steps=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{weights} does not have the contents checkpoint.json lists" in r.stderr
    assert json.loads((run / rundir.SUMMARY).read_text())["resumed_from_step"] == 2
    # the one "resuming" line names the checkpoint really loaded, not the newest one on disk
    assert f"resuming {run} from step_000002 (step 2)" in r.stdout and "step_000004" not in r.stdout, r.stdout[-2000:]


def test_rotation_orders_checkpoints_by_step_not_by_name(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        checkpoint.save(tmp_path, step, {"w": torch.zeros(2)}, {"step": step}, keep=2)
    assert [checkpoint.step_of(p) for p in checkpoint.complete(tmp_path)] == [999_999, 1_000_000]


# ---------------------------------------------------------------------------- 10. Ctrl-C and SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_checkpoints_at_a_step_and_says_how_to_resume(sig, tmp_path, embedded_dir):
    run = tmp_path / "r"
    proc = start([f"hydra.run.dir={run}", "train.steps=3000", "checkpoint.every=1000", *TINY], tmp_path)
    try:
        wait_for(lambda: len(logged_steps(run)) > 3, what="training")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith(f"stopped by {sig.name} after step")]
    assert stopped and f"rlhf-train resume={run}" in out
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert [checkpoint.step_of(p) for p in checkpoint.complete(run)] == [step]
    r = cli("rlhf-train", f"resume={run}", f"train.steps={step + 2}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert logged_steps(run)[-3:] == [step + 1, step + 2, step + 2]  # the train row and the final evaluation


# ---------------------------------------------------------------------------- 14. smaller doors


def test_a_sweep_job_resumed_on_its_own_keeps_its_name_and_its_sweeps_log(tmp_path, embedded_dir):
    sweep = tmp_path / "sw"
    r = cli("rlhf-train", "-m", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
            "optimizer.beta=0.1", "seed=1,2", "train.steps=2", "checkpoint.every=2", "logger=[jsonl]", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    job = next(d for d in sweep.iterdir() if ",seed=1," in d.name)
    assert "=" in job.name and "," in job.name  # what Hydra's override parser cannot take unquoted
    (job / rundir.ERROR).write_text("an old failure\n")
    r = cli("rlhf-train", f"resume={job}", "train.steps=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (job / rundir.ERROR).exists()  # a resumed run that ends well shows no old error
    assert not (job / "metrics_all.jsonl").exists()
    rows = [json.loads(x) for x in (sweep / "metrics_all.jsonl").read_text().splitlines()]
    assert any(r.get("run") == "seed=1" and r.get("step") == 3 for r in rows), rows[-3:]


def test_pairs_that_prefer_nothing_are_refused_and_repeats_are_said(tmp_path):
    from rlhf.contracts.schema import DataConfig
    from rlhf.core.rollout.pairs import load_pairs

    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[2]]))
    with pytest.warns(UserWarning, match=r"1 pair\(s\) repeat an earlier one exactly \(first: row 4 = row 2\)"):
        load_pairs(DataConfig(pairs=str(path), n_eval=1))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"prompt": "p", "chosen": "same", "rejected": "same"}]))
    with pytest.raises(ValueError, match="row 4 has the same chosen and rejected response"):
        load_pairs(DataConfig(pairs=str(path), n_eval=1))


def test_uneven_minibatches_are_said_and_honour_the_count():
    from rlhf.core.rollout.collect import minibatch_indices

    with pytest.warns(UserWarning, match="10 rows do not split evenly into 4 minibatches"):
        parts = minibatch_indices(10, 4, torch.device("cpu"))
    assert [len(p) for p in parts] == [3, 3, 2, 2] and sorted(torch.cat(parts).tolist()) == list(range(10))


def test_a_damaged_embedded_build_is_rebuilt_saying_what_was_wrong(tmp_path, monkeypatch, capsys):
    from rlhf.embedded import build

    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    spec = build.BuildSpec(n_reviews=64, vocab_size=300, policy_steps=2, classifier_steps=2, batch_size=8,
                           policy_loss_target=99.0, classifier_accuracy_target=0.0, held_out=8)  # targets 2 steps meet
    target = build.ensure_built(spec, quiet=True)
    weights = target / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0" * 10)
    assert build.ensure_built(spec, quiet=True) == target
    assert "policy/model.safetensors differs from its manifest); rebuilding it" in capsys.readouterr().err


def test_a_full_disk_stops_the_run_in_one_line_naming_the_resume(tmp_path, embedded_dir):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs to fill up needs root (CI and this machine have it)")
    try:
        run = disk / "run"
        r = cli("rlhf-train", f"hydra.run.dir={run}", "train.steps=500", "checkpoint.every=1", "checkpoint.keep=1000",
                *TINY, cwd=tmp_path)
        assert r.returncode != 0
        assert "rlhf-train: no space left on the device holding " in r.stderr, r.stderr[-2000:]
        assert f"`rlhf-train resume={run}` from step_" in r.stderr
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_compare_lists_an_interrupted_run_and_a_resume_is_no_knob(small_sweep, tmp_path):
    """Every run directory of a sweep is accounted for: one that never finished is listed with its
    last step and how to go on; bookkeeping (resume, resume_force) never splits a method."""
    import shutil

    from omegaconf import OmegaConf

    sweep = tmp_path / "sw"
    shutil.copytree(small_sweep, sweep)
    shutil.copytree(sweep / "0", sweep / "2")
    (sweep / "2" / rundir.SUMMARY).unlink()  # killed before its end: no summary
    config = OmegaConf.load(sweep / "1" / rundir.CONFIG)  # resumed once: its record names the resume
    config.resume, config.resume_force = str(sweep / "1"), True
    OmegaConf.save(config, sweep / "1" / rundir.CONFIG)
    r = cli("rlhf-compare", str(sweep), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "3 runs: 2 finished, 1 incomplete (not in the table):", r.stdout[:2000]
    assert lines[1].startswith(f"  {sweep / '2'}: incomplete, last logged step 1; continue it with `rlhf-train "
                               f"resume={sweep / '2'}` (from step_"), lines[1]
    header = lines[2].split()
    assert "resume" not in header and "resume_force" not in header and "seed" in header, header


def test_a_run_composed_with_a_config_dir_resumes_and_a_gone_dir_is_named(tmp_path, embedded_dir):
    conf = tmp_path / "presets" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\ntrain:\n  steps: 4\ncheckpoint:\n  every: 2\n")
    run = tmp_path / "run"
    r = cli("rlhf-train", "--config-dir", str(tmp_path / "presets"), "+experiment=mine", f"hydra.run.dir={run}", *TINY,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("rlhf-train", f"resume={run}", "train.steps=6", cwd=tmp_path)  # the run recorded its --config-dir
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / rundir.SUMMARY).read_text())["steps"] == 6
    (tmp_path / "presets").rename(tmp_path / "moved")
    r = cli("rlhf-train", f"resume={run}", "train.steps=8", cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "composed with --config-dir" in r.stderr and "--config-dir=<dir>" in r.stderr
    r = cli("rlhf-train", f"resume={run}", "train.steps=8", "--config-dir", str(tmp_path / "moved"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
