"""The DPO paper's design: pairs sampled from a policy and labelled by a reward source
(rlhf-make-pairs), Preferred-FT (optimizer=sft), sweeps as a union of grids, frontiers over
seeds with bootstrap bands, and the `dpo_paper` preset end to end on a small variant."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import cli, compose

from rlhf.apps.make_pairs import pair_records
from rlhf.apps.sweep import grid_jobs
from rlhf.core.evaluation import frontier as fr

# ------------------------------------------------------------------ pairs from a policy


def test_pair_records_order_ties_margins_and_empty_responses():
    recs = pair_records("q", ["good", "bad", "fine", ""], [0.9, 0.2, 0.85, 0.5], margin=0.1)
    assert len(recs) == 6  # every two of four
    by = {(r["chosen"], r["rejected"]): r for r in recs}
    assert by[("good", "bad")]["label"] == "preferred" and by[("good", "bad")]["scores"] == [0.9, 0.2]
    assert by[("good", "fine")]["label"] == "tie"  # 0.9 vs 0.85: within the margin
    assert [r["label"] for r in recs].count("skip") == 3  # each pair with the empty response
    assert pair_records("q", ["same", "same "], [0.9, 0.1], margin=0)[0]["label"] == "tie"  # one text twice
    assert all(r["scores"][0] >= r["scores"][1] for r in recs)
    # the higher score is chosen whichever came first
    assert pair_records("q", ["a", "b"], [0.1, 0.7], margin=0)[0]["chosen"] == "b"


def _lines(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "when"} for r in rows]


@pytest.mark.slow
def test_make_pairs_writes_rlhf_labels_format_continues_exactly_and_refuses_other_settings(tmp_path, embedded_dir):
    out = tmp_path / "pairs.jsonl"
    args = [f"pairs.out={out}", "pairs.samples=3", "pairs.batch_size=4", "data.n_train=12", "sampler.max_new_tokens=8"]
    r = cli("rlhf-make-pairs", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = _lines(out)
    assert len(rows) == 36 and "36/36 pairs" in r.stdout  # 12 prompts x 3 pairs
    for row in rows:  # what rlhf-label writes, and readers need
        assert {"prompt", "chosen", "rejected", "label", "index", "who", "policy", "sampler", "seed"} <= set(row)
        assert row["who"] == "sentiment" and row["label"] in ("preferred", "tie", "skip")
        assert row["scores"][0] >= row["scores"][1]
    assert sorted({(r["index"], r["pair"]) for r in rows}) == [(i, p) for i in range(12) for p in range(3)]
    # the chosen response is the one the reward source scores higher
    from rlhf.contracts import registry

    reward = registry.instantiate("reward", compose().reward)
    pref = [r for r in rows if r["label"] == "preferred"][:6]
    c = reward.score([r["prompt"] for r in pref], [r["chosen"] for r in pref])
    j = reward.score([r["prompt"] for r in pref], [r["rejected"] for r in pref])
    assert (torch.as_tensor(c) >= torch.as_tensor(j)).all()

    # killed mid-way: the last block gone and half a line left; the same command writes the same pairs
    whole = out.read_bytes()
    cut = whole[: whole.index(b"\n", len(whole) // 2) + 40]
    out.write_bytes(cut)
    r = cli("rlhf-make-pairs", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _lines(out) == rows
    # complete: a rerun adds nothing
    r = cli("rlhf-make-pairs", *args, cwd=tmp_path)
    assert r.returncode == 0 and _lines(out) == rows
    # other settings do not continue the file: named, with the fix
    r = cli("rlhf-make-pairs", *args[:-1], "sampler.max_new_tokens=12", cwd=tmp_path)
    assert r.returncode == 1 and "was made with sampler=" in r.stderr and "pairs.out=" in r.stderr, r.stderr
    assert _lines(out) == rows
    # DPO and the reward model read the file as they read rlhf-label's
    from rlhf.contracts.schema import DataConfig
    from rlhf.core.rollout.pairs import load_pairs

    train, held_out = load_pairs(DataConfig(pairs=str(out), n_eval=4, n_train=1000))
    assert len(train) + len(held_out) == sum(r["label"] == "preferred" for r in rows)


def test_make_pairs_refuses_fewer_than_two_samples(tmp_path):
    r = cli("rlhf-make-pairs", f"pairs.out={tmp_path / 'p.jsonl'}", "pairs.samples=1", cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "pairs.samples" in r.stderr and "at least 2" in r.stderr, r.stderr


# ------------------------------------------------------------------ Preferred-FT


def test_preferred_ft_is_the_mean_nll_of_the_chosen_tokens_and_lowers_it(embedded_dir):
    from omegaconf import OmegaConf

    from rlhf.contracts import registry
    from rlhf.core.loop.update import Updater
    from rlhf.core.model.policy import Policy
    from rlhf.core.rollout.pairs import Pair
    from rlhf.core.rollout.sources.preference_pairs import OfflinePairs
    from rlhf.embedded.corpus import preference_pairs

    cfg = compose("optimizer=sft", "optimizer.lr=1e-2")
    torch.manual_seed(0)
    policy = Policy.load(OmegaConf.to_object(cfg.policy), torch.device("cpu"))
    opt = Updater(registry.instantiate("optimizer", cfg.optimizer), policy)
    b = OfflinePairs.from_text(policy, [Pair(*p) for p in preference_pairs(4, seed=3)], 64, seed=0).next(4)
    with torch.no_grad():
        lp, _, _ = policy.token_logprobs(b.input_ids[:4], b.attention_mask[:4], b.query_len, with_values=False)
        expected = -(lp * b.mask[:4]).sum() / b.mask[:4].sum()
    losses = [opt.step(b)["loss/sft"] for _ in range(8)]
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)
    assert losses[-1] < losses[0] - 0.3  # maximum likelihood: the chosen responses grow likelier


# ------------------------------------------------------------------ a union of grids


def test_grid_jobs_union_replacement_and_shared_keys():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_overrides
    def product(o):
        return BasicSweeper.split_arguments(o, None)[0]
    grids = {"ppo": parse(["optimizer=ppo", "optimizer.beta=0.1,0.2"]), "sft": parse(["optimizer=sft"])}
    def has(grid, key):  # sft has no beta
        return not (grid == "sft" and key == "optimizer.beta")
    jobs, left_out = grid_jobs(grids, parse(["seed=0,1"]), product, has)
    assert sorted(map(tuple, jobs)) == sorted([
        ("optimizer=ppo", "optimizer.beta=0.1", "seed=0"), ("optimizer=ppo", "optimizer.beta=0.1", "seed=1"),
        ("optimizer=ppo", "optimizer.beta=0.2", "seed=0"), ("optimizer=ppo", "optimizer.beta=0.2", "seed=1"),
        ("optimizer=sft", "seed=0"), ("optimizer=sft", "seed=1")]) and not left_out
    # a key a grid sets: the command line's value replaces it there; a grid without the field is left without it
    jobs, left_out = grid_jobs(grids, parse(["optimizer.beta=0.5", "train.steps=4"]), product, has)
    assert sorted(map(tuple, jobs)) == [("optimizer=ppo", "optimizer.beta=0.5", "train.steps=4"),
                                        ("optimizer=sft", "train.steps=4")]
    assert left_out == {"sft": ["optimizer.beta"]}
    # ++key replaces where the grid sets it (the prefix is not part of the key) and goes nowhere else
    # the field is missing; +key (a new key, explicitly) goes to every grid
    jobs, _ = grid_jobs(grids, parse(["++optimizer.beta=0.3", "+foo=1"]), product, has)
    assert sorted(map(tuple, jobs)) == [("optimizer=ppo", "++optimizer.beta=0.3", "+foo=1"), ("optimizer=sft", "+foo=1")]


# ------------------------------------------------------------------ frontiers over seeds


def _curves(level, kl_scale, seeds, rng, noise=0.01):
    return [[(t, kl_scale * t / 10, level * (1 - math.exp(-t / 20)) + rng.normal() * noise) for t in range(0, 70, 10)]
            for _ in range(seeds)]


def test_envelope_is_the_best_reward_at_or_below_each_kl_within_the_range_reached():
    pts = np.array([[0.0, 1.0, 2.0, 3.0], [0.1, 0.5, 0.4, 0.9]])
    got = fr.envelope(pts, np.array([-1.0, 0.0, 1.5, 2.5, 3.0, 4.0]))
    assert np.isnan(got[0]) and np.isnan(got[-1])  # nothing reached yet; never tried
    assert got[1:5].tolist() == [0.1, 0.5, 0.5, 0.9]


def test_a_clearly_better_method_dominates_and_identical_ones_do_not():
    rng = np.random.default_rng(0)
    better = [fr.setting(f"a{b}", _curves(1.0, b, 3, rng)) for b in (1, 2)]
    worse = [fr.setting(f"b{b}", _curves(0.6, b, 3, rng)) for b in (1, 2)]
    twin = [fr.setting(f"c{b}", _curves(1.0, b, 3, rng)) for b in (1, 2)]
    grid = fr.kl_grid(better + worse + twin)
    a, b, c = (fr.frontier(n, s, grid, rng, resamples=300) for n, s in (("A", better), ("B", worse), ("C", twin)))
    spans = fr.dominance(a, b)
    assert spans and spans[0][0] <= 1.1 and spans[-1][1] >= 5.0  # above from the first step on (at step 0 both are 0)
    assert not fr.dominance(b, a)
    lines = fr.statements([a, b])
    assert any(x.startswith("A above B for KL in") for x in lines)
    assert (a.low <= a.mean + 1e-9)[~np.isnan(a.mean)].all() and (a.mean <= a.high + 1e-9)[~np.isnan(a.mean)].all()
    # A and its twin (the same curves, other noise): no long span where either leads
    long = [s for s in fr.dominance(a, c) + fr.dominance(c, a) if s[1] - s[0] > 2.0]
    assert not long, long


def test_one_seed_is_not_compared_and_nan_points_are_left_out():
    rng = np.random.default_rng(0)
    a = [fr.setting("a", _curves(1.0, 1, 1, rng))]
    b = [fr.setting("b", _curves(0.5, 1, 1, rng))]
    grid = fr.kl_grid(a + b)
    lines = fr.statements([fr.frontier("A", a, grid, rng, 50), fr.frontier("B", b, grid, rng, 50)])
    assert all("one seed, left out" in x for x in lines) and len(lines) == 2
    s = fr.setting("n", [[(0, 0.0, 0.1), (10, float("nan"), 0.5), (20, 2.0, float("inf")), (30, 3.0, 0.9)]])
    assert s.steps == [0, 30] and np.isfinite(s.points()).all()
    assert fr.envelope(np.array([[0.0, 1.0, 2.0], [0.2, np.nan, 0.1]]), np.array([0.0, 1.0, 2.0])).tolist() == [0.2, 0.2, 0.2]


def test_interval_of_seed_means():
    rng = np.random.default_rng(0)
    mean, lo, hi = fr.interval([0.5, 0.6, 0.7], rng)
    assert mean == pytest.approx(0.6) and 0.5 <= lo < mean < hi <= 0.7
    assert math.isnan(fr.interval([0.5], rng)[1])


# ------------------------------------------------------------------ the preset, small


def test_a_failing_prepare_command_stops_the_sweep_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("rlhf-train", "+experiment=dpo_paper", f"hydra.sweep.dir={sweep}",
            'hydra.callbacks.prepare.commands.pairs=[rlhf-make-pairs,"pairs.samples=1"]', cwd=tmp_path, timeout=300)
    assert r.returncode != 0
    assert "rlhf-make-pairs failed" in r.stderr and "no job started" in r.stderr and "pairs.log" in r.stderr, r.stderr
    assert not any(p.name.isdigit() for p in sweep.iterdir())  # no job's directory
    assert "pairs.samples" in (sweep / "pairs.log").read_text()


@pytest.mark.slow
def test_dpo_paper_preset_small_variant_end_to_end(tmp_path, embedded_dir):
    sweep = tmp_path / "sweep"
    r = cli("rlhf-train", "+experiment=dpo_paper", f"hydra.sweep.dir={sweep}", "seed=0,1", "train.steps=2", "eval.every=1",
            "optimizer.beta=0.1", "sampler.max_new_tokens=6", "data.n_eval=8", "train.batch_size=8",
            "hydra.launcher.n_jobs=2",  # a launcher setting over the one the preset chooses
            'hydra.callbacks.prepare.commands.pairs=[rlhf-make-pairs,"pairs.out={sweep_dir}/pairs.jsonl",'
            '"pairs.samples=3","data.n_train=30","sampler.max_new_tokens=6"]',
            'hydra.callbacks.prepare.commands.rm=[rlhf-train-rm,"data.pairs={sweep_dir}/pairs.jsonl",'
            '"hydra.run.dir={sweep_dir}/rm","rm.steps=2","rm.batch_size=8","rm.normalize_samples=8","data.n_eval=8"]',
            cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (sweep / "pairs.jsonl").is_file() and (sweep / "rm" / "reward_model").is_dir()
    assert "sweep" in r.stdout and "10 runs, 10 completed, 0 failed" in r.stdout  # 5 grids x 2 seeds; the RM is no job
    configs = {}
    for d in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
        assert cfg.data.pairs == str(sweep / "pairs.jsonl")
        target = cfg.optimizer._target_.rsplit(".", 1)[-1]
        key = (target, bool(cfg.optimizer.get("online")), cfg.reward._target_.rsplit(".", 1)[-1])
        configs.setdefault(key, []).append(cfg.seed)
        if "path" in cfg.reward:
            assert cfg.reward.path == str(sweep / "rm")
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert any("eval/judge/sentiment" in row for row in rows)  # the ground truth on every run
    assert sorted(configs) == sorted([("PPO", False, "SentimentReward"), ("PPO", False, "LearnedReward"),
                                      ("DPO", False, "SentimentReward"), ("DPO", True, "SentimentReward"),
                                      ("PreferredFT", False, "SentimentReward")]), configs
    assert all(sorted(v) == [0, 1] for v in configs.values())
    report = (sweep / "report.html").read_text()
    assert "Over seeds" in report and (sweep / "frontier.png").is_file()
    assert "over seeds (eval/judge/sentiment" in r.stdout
    for method in ("ppo reward=sentiment", "ppo reward=learned_rm", "dpo online", "sft"):
        assert method in r.stdout, method
    d = cli("rlhf-diagnose", str(sweep), cwd=tmp_path, timeout=300)  # the reward model is no run of the sweep's
    assert d.returncode == 0 and d.stdout.count(f"{sweep}/") == 10 and f"{sweep}/rm" not in d.stdout, d.stdout
