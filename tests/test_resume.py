"""Nothing lost: checkpoints, kill -9 and resume, determinism, changed configs, unsafe files."""

import hashlib
import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, deterministic_rows, final_tensors, launch

from rlhf.core.run import checkpoint

FAULTS = {"PYTHONPATH": str(ROOT / "tests"), "RLHF_PLUGINS": "fault_plugins"}
SMALL = ["train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=8"]
RUNS = {  # long enough that a poll every few ms catches the run between two checkpoints
    "ppo": ["optimizer=ppo", "train.steps=30", "checkpoint.every=10", "eval.every=10", *SMALL],
    "dpo": ["optimizer=dpo", "data.n_train=40", "train.steps=60", "checkpoint.every=20", "eval.every=20", *SMALL],
}


def run_dir(cwd: Path) -> Path:
    dirs = [p.parent.parent for p in (cwd / "outputs").rglob(".hydra/config.yaml")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def kill_between_checkpoints(cwd: Path, args: list[str], every: int) -> Path:
    """Start rlhf-train, wait until it has logged two steps past its first checkpoint and not
    written the second, kill -9 it there."""
    proc = launch("rlhf-train", *args, cwd=cwd)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            runs = [p.parent for p in (cwd / "outputs").rglob("metrics.jsonl")] if (cwd / "outputs").exists() else []
            if runs:
                lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
                steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
                done = [p.name for p in checkpoint.complete(runs[0])]
                if steps and max(steps) >= every + 2 and done == [f"step_{every:06d}"]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return runs[0]
            time.sleep(0.003)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.communicate()[1]
    pytest.fail(f"the run ended ({proc.returncode}) before it could be killed between checkpoints: {err[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", RUNS)
def test_killed_run_resumes_bit_identical(optimizer, tmp_path, embedded_dir):
    args = RUNS[optimizer]
    every = int(next(a for a in args if a.startswith("checkpoint.every=")).split("=")[1])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    r = cli("rlhf-train", *args, cwd=tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    whole = run_dir(tmp_path / "a")

    killed = kill_between_checkpoints(tmp_path / "b", args, every)
    assert not (killed / "summary.json").exists()
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) > every  # rows past the checkpoint, which the resume must replace

    r = cli("rlhf-train", f"resume={killed}", cwd=tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {killed} from step_{every:06d}" in r.stdout
    a, b = final_tensors(whole), final_tensors(killed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every logged row after the checkpoint is what the uninterrupted run logged, and only once
    assert deterministic_rows(killed / "metrics.jsonl") == deterministic_rows(whole / "metrics.jsonl")
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] == every


@pytest.mark.slow
def test_checkpoint_half_written_by_a_dying_process_is_never_loaded(tmp_path, embedded_dir):
    """The second checkpoint write dies half-way (os._exit in the middle of its state file):
    resume passes over the wreck, continues from the first, and ends where an unbroken run does."""
    args = ["train.steps=6", "checkpoint.every=2", "eval.every=2", *SMALL]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert cli("rlhf-train", *args, cwd=tmp_path / "a").returncode == 0
    r = cli("rlhf-train", *args, cwd=tmp_path / "b", env={**FAULTS, "CRASH_IN_CHECKPOINT": "2"})
    assert r.returncode == 137, r.stderr[-2000:]
    run = run_dir(tmp_path / "b")
    assert sorted(p.name for p in (run / checkpoint.DIR).iterdir()) == [".partial-step_000004", "step_000002"]
    assert [p.name for p in checkpoint.complete(run)] == ["step_000002"]
    r = cli("rlhf-train", f"resume={run}", cwd=tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from step_000002" in r.stdout
    a, b = final_tensors(run_dir(tmp_path / "a")), final_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in checkpoint.complete(run)] == ["step_000004", "step_000006"]  # keep=2


def test_a_damaged_checkpoint_is_skipped_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"w": torch.full((3,), float(step))}, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_000002", "step_000003"]
    state = tmp_path / checkpoint.DIR / "step_000003" / checkpoint.STATE
    state.write_bytes(state.read_bytes()[:-5])  # truncated after it was written
    with pytest.warns(UserWarning, match="step_000003 is incomplete or damaged"):
        assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_000002"]
    tensors, loaded = checkpoint.load(tmp_path / checkpoint.DIR / "step_000002")
    assert torch.equal(tensors["w"], torch.full((3,), 2.0)) and loaded == {"step": 2}


class _Payload:
    """Unpickling this would write a file: the classic pickle attack."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_runs(tmp_path, embedded_dir):
    args = ["train.steps=2", "checkpoint.every=1", "eval.every=2", *SMALL]
    assert cli("rlhf-train", *args, cwd=tmp_path).returncode == 0
    run = run_dir(tmp_path)
    ckpt = checkpoint.complete(run)[-1]
    marker = tmp_path / "pwned.txt"
    state = torch.load(ckpt / checkpoint.STATE, weights_only=True)
    state["rng"]["python"] = _Payload(str(marker))
    torch.save(state, ckpt / checkpoint.STATE)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())  # size and hash updated: it looks complete
    manifest["files"][checkpoint.STATE] = (ckpt / checkpoint.STATE).stat().st_size
    manifest["sha256"][checkpoint.STATE] = hashlib.sha256((ckpt / checkpoint.STATE).read_bytes()).hexdigest()
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    r = cli("rlhf-train", f"resume={run}", "train.steps=3", cwd=tmp_path)
    assert r.returncode != 0
    assert "holds something other than tensors and plain values, and is refused" in r.stderr
    assert not marker.exists()


def test_resume_with_settings_that_change_the_result_is_refused_unless_forced(tmp_path, embedded_dir):
    args = ["train.steps=2", "checkpoint.every=1", "eval.every=2", *SMALL]
    assert cli("rlhf-train", *args, cwd=tmp_path).returncode == 0
    run = run_dir(tmp_path)
    before = (run / "metrics.jsonl").read_text(), (run / ".hydra" / "config.yaml").read_text()
    from rlhf.apps.train import resume_argv

    with pytest.raises(SystemExit) as refused:  # what rlhf-train does first with its argv, before Hydra
        resume_argv(["rlhf-train", f"resume={run}", "seed=7", "train.batch_size=8", "optimizer=a2c", "train.steps=4"])
    for field in ("seed: 0 -> 7", "train.batch_size: 4 -> 8", "optimizer._target_: 'rlhf_plugins.optimizers.ppo.PPO'"):
        assert field in str(refused.value), str(refused.value)[-2000:]
    assert "resume_force=true" in str(refused.value)
    assert ((run / "metrics.jsonl").read_text(), (run / ".hydra" / "config.yaml").read_text()) == before  # untouched
    # longer, and logging elsewhere, changes no step: allowed
    r = cli("rlhf-train", f"resume={run}", "train.steps=3", "eval.every=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    r = cli("rlhf-train", f"resume={run}", "seed=7", "train.steps=4", "resume_force=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming with changed settings (resume_force=true): seed" in r.stderr
    r = cli("rlhf-train", f"resume={tmp_path / 'nothing'}", cwd=tmp_path)  # and through the CLI
    assert r.returncode != 0 and "not a run directory" in r.stderr


def test_same_seed_same_metrics_and_another_seed_other_metrics(tmp_path, embedded_dir):
    from concurrent.futures import ThreadPoolExecutor

    def run(name_seed):
        name, seed = name_seed
        (tmp_path / name).mkdir()
        r = cli("rlhf-train", f"seed={seed}", "train.steps=3", "eval.every=3", "threads=1", *SMALL, cwd=tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
        return name, (run_dir(tmp_path / name) / "metrics.jsonl").read_text()

    with ThreadPoolExecutor(max_workers=3) as pool:  # side by side: the same result either way
        texts = dict(pool.map(run, [("a", 0), ("b", 0), ("c", 1)]))
    assert deterministic_rows(texts["a"]) == deterministic_rows(texts["b"])
    def train_rows(t):
        return [row for row in map(json.loads, t.splitlines()) if "train/reward" in row]
    assert train_rows(texts["a"]) != train_rows(texts["c"])  # the seed reaches the training batches


# ---------------------------------------------------------------------------- a forced resume does what it says

TOY = ["train.steps=2", "train.batch_size=8", "data.n_train=8", "data.n_eval=4", "eval.every=2",
       "checkpoint.every=1", "eval.kl_to_optimum=false", "threads=1", "train.lr_schedule=constant"]
PRESETS = {"dpo": ["+experiment=toy_bandit_dpo", "data.n_train=16"], "sft": ["+experiment=toy_bandit_dpo",
           "data.n_train=16", "optimizer=sft"]}  # the others: +experiment=toy_bandit optimizer=<name>
# a value other than the default for fields that are not numbers or booleans (with what it needs)
OTHER = {"kl_estimator": ["k3"], "advantage": ["nstep"], "baseline": ["batch"],
         "kl_penalty": ["loss", "optimizer.kl_estimator=k3"], "loss_aggregation": ["sum"], "loss_type": ["ipo"],
         "correction": ["sequence", "proposal=explore"], "label_smoothing": None,  # (refused on bradley_terry pairs)
         "is_cap": ["4.0", "optimizer.correction=token_tis", "proposal=explore"]}
# what a field needs to be in force (rlhf refuses a setting that another leaves without effect)
NEEDS = {"kl_target": ["optimizer.adaptive_kl=true"], "kl_horizon": ["optimizer.adaptive_kl=true"],
         "n_steps": ["optimizer.advantage=nstep"], "clip_coef": ["optimizer.epochs=2"]}


def _changed(field: str, value) -> list[str] | None:
    """Overrides that set optimizer.<field> to another valid value (None: not a setting to change here)."""
    if field in OTHER:
        other = OTHER[field]
        return None if other is None else [f"optimizer.{field}={other[0]}", *other[1:]]
    if isinstance(value, bool):
        return [f"optimizer.{field}={str(not value).lower()}", *NEEDS.get(field, [])]
    if isinstance(value, int):
        return [f"optimizer.{field}={value + 1}", *NEEDS.get(field, [])]
    if isinstance(value, float):
        return [f"optimizer.{field}={value * 0.5 if value else 0.25}", *NEEDS.get(field, [])]
    return None


def _in_force(trainer, field: str):
    """The value a step of `trainer` uses for optimizer.<field>: the torch optimizer's for lr, the KL
    controller's for beta (state a checkpoint restores), the plugin's own config for the rest."""
    if field == "lr":
        return trainer.torch_optimizer.param_groups[0]["lr"]
    if field == "beta" and hasattr(trainer.optimizer, "shaping"):
        return trainer.optimizer.shaping.beta
    return getattr(trainer.optimizer.cfg, field)


@pytest.mark.parametrize("optimizer", ["ppo", "a2c", "reinforce", "rloo", "grpo", "dpo", "sft"])
def test_every_setting_a_forced_resume_changes_is_the_one_in_force(tmp_path, optimizer):
    """resume_force=true lets every setting but RESUME_NEVER change; each must then be the value the
    next step uses, not what the checkpoint's state held (Adam's lr, the KL controller's beta, the
    seed's streams, the schedule), for every field of every optimizer plugin."""
    from omegaconf import OmegaConf

    from rlhf.contracts import schema
    from rlhf.core.loop.trainer import Trainer
    from rlhf.core.run import rundir

    base = [*PRESETS.get(optimizer, ["+experiment=toy_bandit", f"optimizer={optimizer}"]), *TOY]
    cfg = schema.compose(base)
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    (run / rundir.HYDRA).mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / rundir.CONFIG)  # the run's record, as rlhf-train writes it
    saved = checkpoint.complete(run)

    def resumed(*overrides: str) -> Trainer:
        t = Trainer(schema.compose([*base, *overrides, "resume_force=true"]), run)
        t.restore(saved)
        return t

    fields = OmegaConf.to_container(cfg.optimizer)
    tried = []
    for field, value in fields.items():
        overrides = None if field == "_target_" or value is None else _changed(field, value)
        if overrides is None:
            continue
        t = resumed(*overrides)
        want = getattr(t.optimizer.cfg, field)
        assert want != value and _in_force(t, field) == want, (field, value, want, _in_force(t, field))
        assert field in {k.split(".", 1)[1] for k in t.resume_changes if k.startswith("optimizer.")}
        tried.append(field)
    assert {"lr"} <= set(tried) and (optimizer == "sft" or "beta" in tried), tried

    # the seed: new streams from the step after the checkpoint (not the checkpoint's)
    t = resumed("seed=7")
    assert torch.initial_seed() == 7 + 2 and t.resume_changes == {"seed": (0, 7)}
    # a schedule switched on: the lr it gives at this step, from the configured lr
    t = resumed("train.lr_schedule=linear", "train.steps=4")
    assert t.torch_optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr * (1 - 2 / 4))
    # other data: a new pass over it (the old order indexes rows it may not have)
    t = resumed("data.n_train=4")
    assert t.source.order.order == [] and all(i < 4 for i in t.source.order.take(4))


def test_a_forced_change_is_what_the_resumed_steps_log_and_the_run_says_from_which_step(tmp_path, embedded_dir):
    args = ["train.steps=2", "checkpoint.every=1", "eval.every=2", *SMALL]
    assert cli("rlhf-train", *args, cwd=tmp_path).returncode == 0
    run = run_dir(tmp_path)
    r = cli("rlhf-train", f"resume={run}", "optimizer.beta=0.9", "train.steps=4", "resume_force=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run} from step_000002 (step 2); with resume_force=true, from step 3 on: optimizer.beta 0.05 -> 0.9" \
        in r.stdout, r.stdout[-2000:]
    betas = {row["step"]: row["objective/beta"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "objective/beta" in row}
    assert betas == {1: 0.05, 2: 0.05, 3: 0.9, 4: 0.9}
    # what can never change, not even forced
    r = cli("rlhf-train", f"resume={run}", "optimizer=a2c", "resume_force=true", cwd=tmp_path)
    assert r.returncode != 0 and "optimizer._target_ says what its checkpoint holds" in r.stderr, r.stderr[-2000:]
