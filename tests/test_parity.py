"""Parity with TRL: on identical inputs, our DPO loss and its gradient equal DPOTrainer's.

TRL is a test extra, never a runtime dependency. Both sides get their own copies of the same
policy (the embedded SFT model with its weights perturbed, so policy != reference) and of
the same frozen reference, in float32: DPOConfig's default `bf16=False` would run TRL's
reference forward under CPU bf16 autocast, which moves its log-probs by up to 0.08 nats
(that, not the loss, was the 4e-5 gap an earlier comparison found).
"""

import copy
import warnings

import pytest
import torch

from rlhf.contracts.interfaces import PairBatch
from rlhf.contracts.schema import LoraSettings
from rlhf.core.model.policy import Policy
from rlhf.core.rollout.data import MAX_PROMPT_TOKENS
from rlhf.core.rollout.pairs import Pair
from rlhf.core.rollout.sources.preference_pairs import OfflinePairs
from rlhf.embedded.corpus import preference_pairs

trl = pytest.importorskip("trl", reason="TRL is in the test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def models(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_dir / "policy"
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy, ref, AutoTokenizer.from_pretrained(path)


def _trl_loss_and_grads(policy, ref, tok, pairs, beta, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = copy.deepcopy(policy)
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid"], per_device_train_batch_size=len(pairs),
                     use_cpu=True, bf16=False, max_length=None, report_to=[], dataset_num_proc=None)
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(ref), args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, batch


def _rows(batch) -> list[tuple[list[int], list[int]]]:
    """TRL's right-padded [chosen; rejected] batch as (prompt tokens, completion tokens) per row."""
    rows = []
    for ids, attn, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        ids, completion = ids[attn.bool()].tolist(), completion[attn.bool()].tolist()
        start = completion.index(1)
        rows.append((ids[:start], ids[start:]))
    return rows


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_gradient_match_trl(models, beta, tmp_path):
    from rlhf_plugins.optimizers.dpo import DPO

    policy_model, ref_model, tok = models
    # leading spaces: TRL tokenises prompt + chosen as one string, we tokenise them apart
    pairs = [Pair(p, " " + c, " " + r) for p, c, r in preference_pairs(8, seed=3)]
    trl_loss, trl_grads, batch = _trl_loss_and_grads(policy_model, ref_model, tok, pairs, beta, tmp_path)

    # ours, through the core's own path from text: tokenise, batch, cache reference log-probs
    policy = Policy.from_model(copy.deepcopy(policy_model), tok, LoraSettings(enabled=False), torch.device("cpu"),
                               ref_model=copy.deepcopy(ref_model).eval().requires_grad_(False))
    source = OfflinePairs.from_text(policy, pairs, MAX_PROMPT_TOKENS, seed=0)
    b: PairBatch = source.next(len(pairs))
    B = len(pairs)
    ours_rows = [(q, c) for q, c in _unpad(b)]
    # the same token sequences on both sides (in another order: OfflinePairs shuffles)
    assert sorted(zip(ours_rows[:B], ours_rows[B:])) == sorted(zip(_rows(batch)[:B], _rows(batch)[B:]))

    dpo = DPO(DPO.Config(beta=beta))
    policy.train()
    loss = dpo.loss(policy, b, dpo.prepare(b), 0).loss
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) < 1e-6, (loss.item(), trl_loss.item())
    grads = dict(policy.model.named_parameters())
    worst = max((grads[n].grad - g).abs().max().item() for n, g in trl_grads.items())
    largest = max(g.abs().max().item() for g in trl_grads.values())
    assert largest > 1e-3  # a real gradient, not two zeros
    assert worst < 1e-6, worst


def _unpad(b: PairBatch):
    """Each row as (query tokens, response tokens)."""
    for ids, attn, mask in zip(b.input_ids, b.attention_mask, b.mask):
        real = ids[attn.bool()].tolist()
        n = int(mask.sum())
        yield real[: len(real) - n], real[len(real) - n :]
