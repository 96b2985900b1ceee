"""DPO's losses by hand, and the pair batches the core feeds it."""

import json
import math

import pytest
import torch
from conftest import compose
from rlhf_plugins.optimizers.dpo import ipo_loss, sigmoid_loss
from torch.testing import assert_close

from rlhf.contracts import registry
from rlhf.contracts.schema import DataConfig
from rlhf.core.rollout.pairs import Pair, load_pairs
from rlhf.core.rollout.sources.preference_pairs import OfflinePairs
from rlhf.core.rollout.sources.sampled_pairs import OnlinePairs
from rlhf.embedded.corpus import preference_pairs


def test_sigmoid_loss_by_hand():
    h = torch.tensor([2.0, -1.0])
    # beta 0.5: -log sigma(1) = log(1 + e^-1) = 0.31326; -log sigma(-0.5) = log(1 + e^0.5) = 0.97408
    assert_close(sigmoid_loss(h, 0.5, 0.0), torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(0.5))]))
    # label smoothing 0.1 on h = 2: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    expected = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert_close(sigmoid_loss(h[:1], 0.5, 0.1), torch.tensor([expected]))


def test_ipo_loss_by_hand():
    # beta 0.25: target margin 1 / (2 beta) = 2, so (3 - 2)^2 = 1 and (0 - 2)^2 = 4
    assert_close(ipo_loss(torch.tensor([3.0, 0.0]), 0.25, 0.0), torch.tensor([1.0, 4.0]))


def test_embedded_pairs_share_the_prompt_and_differ_in_sentiment():
    pairs = preference_pairs(200, seed=0)
    assert pairs == preference_pairs(200, seed=0)
    assert all(p and c and r and c != r for p, c, r in pairs)
    from rlhf.embedded.corpus import NEG_ADJ, POS_ADJ

    pos, neg = set(POS_ADJ), set(NEG_ADJ)
    assert sum(bool(pos & set(c.split())) for _, c, _ in pairs) > 0.8 * len(pairs)
    assert not any(neg & set(c.split()) for _, c, _ in pairs)
    assert not any(pos & set(r.split()) for _, _, r in pairs)


def test_pair_files_and_their_errors(tmp_path):
    rows = [{"q": f"prompt {i}", "good": f"good {i}", "bad": f"bad {i}"} for i in range(5)]
    fields = dict(prompt_field="q", chosen_field="good", rejected_field="bad", n_eval=2, n_train=10)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.json", "p.parquet"):
        train, held = load_pairs(DataConfig(pairs=str(tmp_path / name), **fields))
        assert held == [Pair("prompt 0", "good 0", "bad 0"), Pair("prompt 1", "good 1", "bad 1")]
        assert len(train) == 3
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"q": "x", "good": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 has no field 'bad' holding text"):
        load_pairs(DataConfig(pairs=str(tmp_path / "bad.jsonl"), **fields))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"q": "x", "good": " ", "bad": "z"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 has an empty chosen or rejected"):
        load_pairs(DataConfig(pairs=str(tmp_path / "empty.jsonl"), **fields))


def _policy():
    from test_policy import _load

    torch.manual_seed(0)
    return _load(True)


def test_offline_pairs_layout_and_reference_computed_once(embedded_dir):
    policy = _policy()
    pairs = [Pair(*p) for p in preference_pairs(6, seed=1)]
    source = OfflinePairs.from_text(policy, pairs, max_prompt_tokens=64, seed=0)
    calls = []
    original = policy.reference_logprobs
    policy.reference_logprobs = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    b = source.next(4)
    tok = policy.tokenizer
    q = b.query_len
    for i in range(4):  # row i and i + 4: the same query, then the response, right-padded
        for row, text in ((i, b.chosen[i]), (i + 4, b.rejected[i])):
            real = b.input_ids[row][b.attention_mask[row].bool()]
            response = b.input_ids[row, q:][b.mask[row].bool()]
            assert torch.equal(real[len(real) - len(response) :], response)  # the response ends the row
            assert response[-1] == tok.eos_token_id
            assert tok.decode(response, skip_special_tokens=True) == text
        n_query = [int(b.attention_mask[r].sum() - b.mask[r].sum()) for r in (i, i + 4)]
        assert n_query[0] == n_query[1] >= q
        assert torch.equal(b.input_ids[i, : n_query[0]], b.input_ids[i + 4, : n_query[0]])
    # packed: as wide as the longest query + response, not the longest query plus the longest response
    assert b.input_ids.shape[1] == int(b.attention_mask.sum(1).max())
    assert calls == [8]
    source.next(2)  # the 2 pairs left in this pass: not seen yet
    assert calls == [8, 4]
    source.next(6)  # a new pass: every pair seen already
    assert calls == [8, 4]


def test_online_pairs_chosen_scores_at_least_rejected(embedded_dir):
    policy = _policy()
    cfg = compose()
    reward = registry.instantiate("reward", cfg.reward)
    sampler = registry.instantiate("sampler", cfg.sampler)
    prompts = policy.tokenizer(["The film was", "Sadly, the plot", "Mira plays"] * 2, add_special_tokens=False)["input_ids"]
    b = OnlinePairs(policy, reward, prompts, sampler, seed=0).next(6)
    assert b.input_ids.shape[0] == 12 and (b.scores[:6] >= b.scores[6:]).all()
    assert_close(reward.score(b.queries, b.chosen), b.scores[:6], atol=1e-5, rtol=0)


def test_offline_dpo_from_a_local_pair_file(tmp_path, embedded_dir):
    from rlhf.core.loop.trainer import Trainer

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in preference_pairs(12, seed=5)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose("optimizer=dpo", "data=preferences", f"data.pairs={tmp_path / 'pairs.jsonl'}",
                  "data.n_eval=4", "train.batch_size=4", "train.steps=2", "eval.every=2", "sampler.max_new_tokens=6")
    t = Trainer(cfg, tmp_path / "run")
    assert t.optimizer.consumes == "preference_pairs"
    summary = t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/dpo" in r] == [1, 2] and summary["steps"] == 2
    assert rows[1]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1


def test_pairs_by_dataset_name_go_through_datasets(tmp_path):
    """A name that is not a file goes to datasets.load_dataset, as a hub name would; a local
    folder of JSONL files stands in for the hub here (no network)."""
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]
    (tmp_path / "prefs").mkdir()
    (tmp_path / "prefs" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, held = load_pairs(DataConfig(pairs=str(tmp_path / "prefs"), n_eval=2))
    assert held == [Pair("p0", "c0", "r0"), Pair("p1", "c1", "r1")] and len(train) == 4


def test_soft_labels_are_the_expected_hard_label_loss():
    h, p = torch.tensor([1.5, -0.5]), torch.tensor([0.8, 0.3])  # P(chosen preferred)
    soft = sigmoid_loss(h, 0.5, 1 - p)
    hard_chosen, hard_flipped = sigmoid_loss(h, 0.5, 0.0), sigmoid_loss(-h, 0.5, 0.0)
    assert_close(soft, p * hard_chosen + (1 - p) * hard_flipped)
