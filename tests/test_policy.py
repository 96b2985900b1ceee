"""LoRA-shared reference, value head on the trunk, full fine-tuning fallback, PPO updates."""

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from rlhf.contracts import registry
from rlhf.contracts.schema import LoraSettings, PolicyConfig
from rlhf.core.loop.update import Updater
from rlhf.core.model.policy import Policy
from rlhf.core.rollout import collect, sampling
from rlhf.core.toolkit import numerics

CPU = torch.device("cpu")


def logprobs(policy, input_ids, attention_mask, query_len, temperature):
    """log pi of each response token at `temperature`, and the values: one forward pass."""
    logits, values = policy.forward(input_ids, attention_mask, query_len)
    return numerics.logprobs_of(logits, input_ids[:, query_len:], temperature), values


def ppo_steps(policy: Policy, steps: int = 3, overrides: tuple[str, ...] = ()):
    """A few PPO updates on real rollouts; returns (reward source, metrics of each step)."""
    cfg = compose(*overrides)
    ppo = registry.instantiate("optimizer", cfg.optimizer)
    reward = registry.instantiate("reward", cfg.reward)
    sampler = registry.instantiate("sampler", cfg.sampler)
    policy.attach_value_head()
    updater = Updater(ppo, policy)
    queries = [policy.tokenizer("The movie was", add_special_tokens=False).input_ids] * 8
    history = []
    for _ in range(steps):
        batch = collect.collect(policy, reward, queries, sampler.generation_kwargs(), sampler.temperature)
        history.append(updater.step(batch))
    return reward, history


def _load(lora: bool) -> Policy:
    cfg = OmegaConf.to_object(compose(f"policy.lora.enabled={lora}").policy)
    torch.manual_seed(0)
    return Policy.load(cfg, CPU)


def test_lora_ppo_changes_adapters_and_value_head_only(embedded_dir):
    policy = _load(True)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    _, history = ppo_steps(policy)
    stats = history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k != "optim/grad_norm")
    for n, p in policy.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
        else:
            assert not torch.equal(p, adapters[n]), f"adapter {n} did not change"
    assert all(p.abs().sum() > 0 for p in policy.value_head.parameters())  # zero-initialised, now trained


def test_reference_is_the_base_with_adapters_off(embedded_dir):
    policy = _load(True)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # make the adapters matter
    plain = Policy.load(PolicyConfig(lora=LoraSettings(enabled=False)), CPU).model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    ref = policy.reference_logits(ids, mask, 2)
    assert_same = torch.allclose(ref, plain(input_ids=ids).logits[:, 1:-1], atol=1e-5)
    assert assert_same, "adapter-disabled logits differ from the base model's"
    adapted, _ = policy.forward(ids, mask, 2)
    assert not torch.allclose(adapted, ref, atol=1e-3)
    # one copy of the base weights: no tensor is duplicated for the reference
    assert policy.reference_model is None


def test_full_finetuning_keeps_a_frozen_reference_copy(embedded_dir):
    policy = _load(False)
    ref_before = {n: p.clone() for n, p in policy.reference_model.named_parameters()}
    trained_before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    ppo_steps(policy, steps=2)
    assert all(torch.equal(p, ref_before[n]) for n, p in policy.reference_model.named_parameters())
    assert any(not torch.equal(p, trained_before[n]) for n, p in policy.model.named_parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(policy.model.parameters(), policy.reference_model.parameters()))


def test_value_head_reads_the_shared_trunk(embedded_dir):
    policy = _load(True)
    policy.attach_value_head()
    torch.nn.init.normal_(policy.value_head.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    _, values = policy.forward(ids, torch.ones_like(ids), 2)
    values[0].sum().backward()  # the value loss reaches the adapters of the trunk
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.model.named_parameters() if "lora_" in n)
    extra = sum(p.numel() for p in policy.value_head.parameters())
    assert extra == policy.model.config.hidden_size + 1


def test_dropout_is_off_in_the_policy(embedded_dir):
    policy = _load(True)
    assert all(m.p == 0.0 for m in policy.model.modules() if isinstance(m, torch.nn.Dropout))


def test_rollout_masks_and_logprobs_match_generation(embedded_dir):
    policy = _load(True)
    cfg = compose("sampler.max_new_tokens=12")
    sampler = registry.instantiate("sampler", cfg.sampler)
    reward = registry.instantiate("reward", cfg.reward)
    tok = policy.tokenizer
    queries = [tok("The", add_special_tokens=False).input_ids, tok("What a dull", add_special_tokens=False).input_ids]
    torch.manual_seed(1)
    r = collect.collect(policy, reward, queries, sampler.generation_kwargs(), sampler.temperature)
    assert r.input_ids.shape[0] == 2 and r.scores.shape == (2,)
    assert ((r.scores >= 0) & (r.scores <= 1)).all()  # probabilities
    # no token after the first EOS counts; the EOS itself does
    resp = r.input_ids[:, r.query_len :]
    for row, m in zip(resp, r.mask):
        eos = (row == tok.eos_token_id).nonzero()
        n = int(m.sum())
        if len(eos):
            assert n == int(eos[0]) + 1
    # with LoRA at init (B = 0) policy and reference agree exactly
    assert torch.allclose(r.logprobs, r.ref_logprobs, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(min_query_tokens=5, max_query_tokens=5), dict(temperature=0.0)])
def test_sampler_rejects_bad_settings(bad):
    info = next(p for p in registry.plugins("sampler") if p.name == "length")
    with pytest.raises(ValueError, match="sampler"):
        info.cls(info.cls.Config(**bad))


def test_sampler_names_settings_that_bias_the_kl():
    info = next(p for p in registry.plugins("sampler") if p.name == "length")
    assert info.cls(info.cls.Config()).kl_bias() == []
    biased = info.cls(info.cls.Config(top_k=5, top_p=0.9, min_new_tokens=2, num_beams=2)).kl_bias()
    assert biased == ["sampler.top_k=5", "sampler.top_p=0.9", "sampler.min_new_tokens=2", "sampler.num_beams=2"]


def test_forward_logprobs_equal_generate_scores_with_left_padding(embedded_dir):
    """Positions skip the left padding exactly as generate does, so log pi_old is exact."""
    policy = _load(True)
    tok = policy.tokenizer
    queries = [tok("The", add_special_tokens=False).input_ids, tok("Honestly, the plot was", add_special_tokens=False).input_ids]
    ids, mask = sampling.pad_left(queries, tok.pad_token_id, CPU)
    torch.manual_seed(3)
    out = policy.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                temperature=0.7, max_new_tokens=6, min_new_tokens=6, eos_token_id=None,
                                pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    q = ids.shape[1]
    gen_logp = torch.stack([torch.log_softmax(step_logits / 0.7, -1) for step_logits in out.logits], 1)  # (B, T, V)
    gen_logp = gen_logp.gather(-1, out.sequences[:, q:, None]).squeeze(-1)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, q:])], 1)
    logp, _ = logprobs(policy, out.sequences, full_mask, q, temperature=0.7)
    torch.testing.assert_close(logp, gen_logp, atol=1e-4, rtol=0)


def test_sampling_loop_logprobs_and_values_equal_a_full_forward(embedded_dir):
    """The loop reads log pi and V off the logits it samples from; they must be what a
    separate forward pass over the finished sequences gives (left padding included)."""
    policy = _load(True)
    policy.attach_value_head()
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # adapters that matter
        policy.value_head.weight.normal_()
    tok = policy.tokenizer
    queries = [tok("The", add_special_tokens=False).input_ids, tok("Honestly, the plot was", add_special_tokens=False).input_ids]
    torch.manual_seed(0)
    g = sampling.generate(policy, queries * 4, dict(do_sample=True, temperature=0.7, max_new_tokens=10), 0.7, with_values=True)
    assert g.logprobs is not None and g.values is not None
    logp, values = logprobs(policy, g.input_ids, g.attention_mask, g.query_len, temperature=0.7)
    torch.testing.assert_close(g.logprobs, logp * g.mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.values, values * g.mask, atol=1e-5, rtol=0)
    assert (g.logprobs[g.mask == 0] == 0).all()


@pytest.mark.parametrize("settings", [dict(), dict(top_k=3), dict(top_p=0.6), dict(temperature=0.5, top_k=5, top_p=0.9)])
def test_sampling_loop_draws_from_the_filtered_softmax(settings):
    """20,000 one-token draws on the toy model: frequencies match softmax(logits / T) after
    transformers' own top-k and top-p filters, within 4 standard errors."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from rlhf.embedded.toy import toy_policy_path

    policy = Policy.load(PolicyConfig(path=toy_policy_path()), CPU)
    x = policy.tokenizer("x1", add_special_tokens=False).input_ids
    n = 20_000
    torch.manual_seed(0)
    g = sampling.generate(policy, [x] * n, dict(do_sample=True, max_new_tokens=1, **settings))
    counts = torch.bincount(g.input_ids[:, -1], minlength=len(policy.tokenizer)).double()
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([x])).logits[:, -1]
    for warper in (TemperatureLogitsWarper(settings.get("temperature", 1.0)),
                   TopKLogitsWarper(settings.get("top_k", 0) or logits.shape[-1]),
                   TopPLogitsWarper(settings.get("top_p", 1.0))):
        logits = warper(None, logits)
    p = logits.softmax(-1)[0].double()
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 4 * se + 1e-12).all(), (counts / n, p)
    assert (counts[p == 0] == 0).all()  # filtered tokens never drawn


def test_other_generation_settings_go_to_transformers_generate(embedded_dir):
    """Beams and a repetition penalty are not the loop's: generate() hands them to
    transformers, and collect() then computes log-probs with a forward pass."""
    policy = _load(True)
    cfg = compose("sampler.repetition_penalty=1.3", "sampler.max_new_tokens=6")
    sampler = registry.instantiate("sampler", cfg.sampler)
    assert not sampling.sampling_loop_handles(sampler.generation_kwargs())
    tok = policy.tokenizer
    queries = [tok("The movie was", add_special_tokens=False).input_ids] * 3
    g = sampling.generate(policy, queries, sampler.generation_kwargs())
    assert g.logprobs is None
    r = collect.collect(policy, registry.instantiate("reward", cfg.reward), queries, sampler.generation_kwargs(), 1.0)
    assert torch.allclose(r.logprobs, r.ref_logprobs, atol=1e-5) and (r.logprobs != 0).any()
