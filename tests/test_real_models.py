"""What users bring: instruction-tuned architectures (Llama, Qwen2) with chat templates and
several end tokens, conversational data, and runs they trained and want to go on from,
sample from and export. The models are built here with random weights
(rlhf.embedded.chat_models) and saved with their tokenizer and chat template."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BIN, cli

from rlhf.contracts.schema import LoraSettings, PolicyConfig
from rlhf.core.model.policy import Policy
from rlhf.core.rollout import collect, sampling
from rlhf.core.rollout.data import Rendered, encode_prompt, render, response_ids, tokenize_prompts

CHAT_PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a in range(6) for b in range(4)]


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory) -> dict[str, str]:
    from rlhf.embedded.chat_models import build_chat_model

    out = tmp_path_factory.mktemp("chat")
    return {family: str(build_chat_model(family, out / family)) for family in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, str]:
    """Conversational prompts and preference pairs, as TRL's conversational datasets hold them."""
    out = tmp_path_factory.mktemp("chatdata")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CHAT_PROMPTS))
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": p, "chosen": [{"role": "assistant", "content": f"It is {i}."}],
        "rejected": [{"role": "assistant", "content": "I do not know."}]}) + "\n" for i, p in enumerate(CHAT_PROMPTS)))
    return {"prompts": str(prompts), "pairs": str(pairs)}


def _policy(path: str, **lora) -> Policy:
    return Policy.load(PolicyConfig(path=path, lora=LoraSettings(**lora)), torch.device("cpu"))


def _run(root: Path) -> Path:
    return next(root.rglob("summary.json")).parent


def _evals(run: Path) -> list[dict]:
    return [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/reward" in row]


# ------------------------------------------------------------------ architectures and templates


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_architectures_are_laid_out_as_the_real_ones(chat_models, family):
    policy = _policy(chat_models[family])
    tok, config = policy.tokenizer, policy.model.get_base_model().config
    ends = {t: tok.convert_tokens_to_ids(t) for t in
            (["<|eot_id|>", "<|end_of_text|>"] if family == "llama" else ["<|im_end|>", "<|endoftext|>"])}
    assert policy.eos_ids == sorted(ends.values())  # both end a turn, from the generation config
    assert config.tie_word_embeddings == (family == "qwen2")
    text = render(tok, CHAT_PROMPTS[0])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" if family == "llama"
                         else "<|im_start|>assistant\n")
    # the preset's all-linear targets suit any architecture: every projection of every layer adapted
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in policy.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_target_modules_of_another_architecture_are_refused_naming_this_ones(chat_models):
    with pytest.raises(ValueError, match=r"\['c_attn', 'c_fc'\] not in this model .*q_proj.*all-linear"):
        _policy(chat_models["qwen2"], target_modules=["c_attn", "c_fc", "q_proj"])


def test_generation_stops_at_any_end_token(chat_models):
    policy = _policy(chat_models["llama"])
    tok = policy.tokenizer
    second_end = tok.convert_tokens_to_ids("<|end_of_text|>")
    base = policy.model.get_base_model()
    torch.manual_seed(0)
    with torch.no_grad():  # make the second end token (not the tokenizer's eos) likely at every step
        base.lm_head.weight[second_end] = base.model.norm.weight.detach() * 0.5
    queries = tokenize_prompts(tok, CHAT_PROMPTS[:8])
    assert all(isinstance(q, Rendered) for q in queries)
    g = sampling.generate(policy, queries, {"max_new_tokens": 30, "temperature": 1.0})
    responses = g.input_ids[:, g.query_len:]
    ended = (responses == second_end).any(1)
    assert ended.sum() >= 4  # most rows stop at <|end_of_text|>, well before the cap
    for row, mask in zip(responses[ended], g.mask[ended]):
        stop = int((row == second_end).nonzero()[0])
        assert mask[: stop + 1].all() and not mask[stop + 1 :].any()
    queries_text, texts = collect.decode(policy, g.input_ids, g.attention_mask, g.query_len)
    assert all("<|end_of_text|>" not in t for t in texts)
    assert all(q.startswith("<|begin_of_text|><|start_header_id|>user") for q in queries_text)  # rendered, kept


def test_a_pairs_response_ends_with_the_templates_end_of_turn(chat_models):
    for family, end in (("qwen2", "<|im_end|>"), ("llama", "<|eot_id|>")):
        policy = _policy(chat_models[family])
        tok = policy.tokenizer
        ids = response_ids(tok, CHAT_PROMPTS[0], "It is 1.", policy.eos_ids)
        assert tok.decode(ids) == f"It is 1.{end}"  # what the template writes, cut after the end of turn
        assert tok.decode(response_ids(tok, "plain", " text", policy.eos_ids)) == f" text{tok.eos_token}"


def test_conversational_data_without_a_chat_template_is_refused_before_training(tmp_path, chat_data):
    r = cli("rlhf-train", "+experiment=toy_bandit", f"data.prompts={chat_data['prompts']}", "data.prompt_list=[]",
            "data.text_field=prompt", "data.n_eval=4", "train.steps=1", cwd=tmp_path)
    assert r.returncode != 0
    assert "no chat template" in r.stderr and "policy.chat_template" in r.stderr
    assert "Traceback" not in r.stderr[-600:] and not list(tmp_path.rglob("metrics.jsonl"))


# ------------------------------------------------------------------ training on them


@pytest.mark.slow
@pytest.mark.parametrize("family,optimizer", [("qwen2", "ppo"), ("llama", "grpo")])
def test_on_policy_training_on_conversations(tmp_path, chat_models, chat_data, family, optimizer):
    """The bug this closes: policy.path=<a Qwen2 model> kept the embedded preset's GPT-2 module names."""
    r = cli("rlhf-train", f"policy.path={chat_models[family]}", f"optimizer={optimizer}", "reward=lexicon",
            f"data.prompts={chat_data['prompts']}", "data.text_field=prompt", "data.n_eval=4", "train.steps=2",
            "train.batch_size=8", "sampler.max_new_tokens=6", "eval.every=2", "threads=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _run(tmp_path)
    sample = json.loads((run / "samples" / "step_00002.jsonl").read_text().splitlines()[0])
    assert sample["query"].endswith("assistant<|end_header_id|>\n\n" if family == "llama" else "<|im_start|>assistant\n")
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(chat_models[family]).resolve())
    tok = Policy.load_trained(PolicyConfig(path=str(run)), torch.device("cpu")).tokenizer
    ids = encode_prompt(tok, CHAT_PROMPTS[5]) + tok("It is 6.", add_special_tokens=False)["input_ids"]
    _exported_log_probs_match(run, tmp_path / f"export-{family}", "merged", ids)  # tied (qwen2) and untied (llama)


@pytest.mark.slow
def test_dpo_and_a_reward_model_on_conversational_pairs(tmp_path, chat_models, chat_data):
    (tmp_path / "dpo").mkdir()
    r = cli("rlhf-train", f"policy.path={chat_models['qwen2']}", "optimizer=dpo", f"data.pairs={chat_data['pairs']}",
            f"data.prompts={chat_data['prompts']}", "data.text_field=prompt", "data.n_eval=4", "train.steps=3",
            "train.batch_size=4", "sampler.max_new_tokens=4", "eval.every=3", "reward=lexicon", "threads=1",
            cwd=tmp_path / "dpo")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in map(json.loads, (_run(tmp_path / "dpo") / "metrics.jsonl").read_text().splitlines())
            if "loss/dpo" in row]
    assert rows and rows[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # starts at log 2: pi = pi_ref
    (tmp_path / "rm").mkdir()
    r = cli("rlhf-train-rm", f"rm.base={chat_models['llama']}", f"policy.path={chat_models['llama']}",
            f"data.pairs={chat_data['pairs']}", f"data.prompts={chat_data['prompts']}", "data.text_field=prompt",
            "data.n_eval=4", "rm.steps=2", "rm.batch_size=4", "rm.normalize_samples=4", "sampler.max_new_tokens=4",
            "threads=1", cwd=tmp_path / "rm")
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------ using what you trained


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    r = cli("rlhf-train", "+experiment=toy_bandit", "optimizer=reinforce", "optimizer.beta=0.5", "train.steps=40",
            "train.batch_size=32", "eval.every=40", "threads=1", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return _run(root)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["base", "start"])
def test_training_goes_on_from_a_run_with_the_reference_said(tmp_path, trained_run, reference):
    """Step 0 of a run started from a finished run evaluates the trained policy (the same held-out
    samples, so the same reward); its KL is to the original base (the same KL) or to itself (0)."""
    target = trained_run if reference == "base" else trained_run / "final"
    r = cli("rlhf-train", "+experiment=toy_bandit_dpo", f"policy.path={target}",
            f"policy.reference={reference}", "train.steps=1", "eval.every=1", "threads=1",
            "train.batch_size=32", "data.n_train=64", cwd=tmp_path)  # the batch size chunks evaluation: kept
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = _evals(trained_run)[-1], _evals(_run(tmp_path))[0]
    assert after["eval/reward"] == pytest.approx(before["eval/reward"], abs=1e-6)
    assert after["eval/kl"] == (pytest.approx(before["eval/kl"], abs=1e-5) if reference == "base" else pytest.approx(0, abs=1e-6))
    assert before["eval/kl"] > 0.05  # the trained policy is not the base: dropping its adapters would show


@pytest.mark.slow
def test_a_run_records_a_portable_base_and_a_model_card(trained_run):
    final = trained_run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == "toy"
    card = (final / "README.md").read_text()
    assert "base_model: toy" in card and "reward_end" in card and "## Config" in card
    assert (final / "reward_kl.png").is_file() is (len(_evals(trained_run)) > 1)


EXPORT_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    out, kind, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if kind == "adapters":
        from peft import PeftModel
        base = json.load(open(out + "/adapter_config.json"))["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    assert not [m for m in sys.modules if m == "rlhf" or m.startswith(("rlhf.", "rlhf_plugins"))]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    print(json.dumps(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()))
""")


def _exported_log_probs_match(run: Path, out: Path, kind: str, ids: list[int]) -> torch.Tensor:
    """Export `run` and check, in a process that never imports this project, that the export's
    log-probs of `ids` are the trained policy's; returns them."""
    r = cli("rlhf-export", str(run), str(out), *(["--adapters"] if kind == "adapters" else []), cwd=out.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "README.md").is_file() and (out / "tokenizer_config.json").is_file()
    policy = Policy.load_trained(PolicyConfig(path=str(run)), torch.device("cpu"))
    with torch.no_grad():
        logits = policy.model(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    plain = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(out), kind, json.dumps(ids)],
                           capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert plain.returncode == 0, plain.stderr[-3000:]
    got = torch.tensor(json.loads(plain.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["merged", "adapters"])
def test_an_export_loads_with_plain_transformers_and_peft_to_the_runs_log_probs(tmp_path, trained_run, kind):
    out = tmp_path / "export"
    ids = [0, 3, 4, 5, 2]  # x0 y1 y2 y3 y0 in the toy's vocabulary
    expected = _exported_log_probs_match(trained_run, out, kind, ids)
    base = Policy.load(PolicyConfig(path="toy"), torch.device("cpu"))
    with torch.no_grad():
        untrained = torch.log_softmax(base.model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    assert (untrained.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0] - expected).abs().max() > 1e-2
    again = cli("rlhf-export", str(trained_run), str(out), cwd=tmp_path)
    assert again.returncode == 1 and "not empty" in again.stderr  # nothing overwritten


@pytest.mark.slow
def test_generate_samples_the_trained_policy_and_talks_interactively(tmp_path, trained_run):
    r = cli("rlhf-generate", str(trained_run), "x1", "-n", "3", "--max-new-tokens", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"[{i + 1}]") for i, line in enumerate(lines))
    bad = cli("rlhf-generate", str(tmp_path / "nothing-here"), "x1", cwd=tmp_path)
    assert bad.returncode == 1 and "rlhf-generate:" in bad.stderr and "Traceback" not in bad.stderr
    talk = subprocess.run([str(BIN / "rlhf-generate"), str(trained_run), "--max-new-tokens", "1"], input="x0\nx1\n\n",
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert talk.returncode == 0, talk.stderr[-3000:]
    assert len(talk.stdout.strip().splitlines()) == 2


# ------------------------------------------------------------------ knobs


def test_gradient_checkpointing_gives_the_same_gradients(chat_models):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapters in both
        policy = Policy.load(PolicyConfig(path=chat_models["llama"], gradient_checkpointing=checkpointing),
                             torch.device("cpu"))
        for name, p in policy.model.named_parameters():  # the same non-zero adapters in both
            if "lora_B" in name:
                torch.nn.init.constant_(p, 0.01)
        policy.train()
        ids = torch.tensor([encode_prompt(policy.tokenizer, CHAT_PROMPTS[3]) + [5, 6, 7, 8]])
        logits, _ = policy.forward(ids, torch.ones_like(ids), ids.shape[1] - 4, with_values=False)
        logits.float().log_softmax(-1)[..., 9].sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_the_response_length_sampler_draws_a_cap_per_batch_and_warns():
    import random

    from rlhf_plugins.samplers.length import LengthSampler

    sampler = LengthSampler(LengthSampler.Config(min_response_tokens=3, max_new_tokens=9))
    rng = random.Random(0)
    caps = []
    for _ in range(200):
        sampler.sample([[1, 2, 3, 4, 5, 6, 7, 8, 9]], rng)
        caps.append(sampler.generation_kwargs()["max_new_tokens"])
    assert set(caps) == set(range(3, 10))
    eval_caps = {(sampler.sample([[1, 2, 3]], random.Random(1234)), sampler.generation_kwargs()["max_new_tokens"])[1]
                 for _ in range(5)}
    assert len(eval_caps) == 1  # evaluation's fixed seed: the same cap each time
    assert any("not samples that end there" in w for w in sampler.notices())
    off = LengthSampler(LengthSampler.Config(max_new_tokens=9))
    r1, r2 = random.Random(5), random.Random(5)
    off.sample([[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 4, r1)
    [r2.randrange(2, 8) for _ in range(4)]
    assert r1.random() == r2.random() and off.generation_kwargs()["max_new_tokens"] == 9  # off: the stream is unchanged


@pytest.mark.parametrize("family", ["llama", "qwen2", "embedded"])
def test_chunked_log_probs_equal_the_full_logits_path_with_their_gradients(chat_models, family, monkeypatch):
    """The vocabulary projection a chunk of positions at a time (checkpointed) gives the
    log-probs, values, entropy and gradients of the full (B, T, V) logits path. Chunks of 7
    rows here, so several chunks and a ragged last one are exercised."""
    from rlhf.core.model import logprobs as policy_module

    policy = Policy.load(PolicyConfig(path=chat_models.get(family, family)), torch.device("cpu"))
    monkeypatch.setattr(policy_module, "LOGITS_PER_CHUNK", 7 * policy.vocab_size)
    torch.manual_seed(0)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    policy.attach_value_head()
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    ids = torch.randint(0, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    results = []
    for chunked in (True, False):
        policy.chunked = chunked
        policy.model.zero_grad()
        policy.value_head.zero_grad()
        logprobs, values, entropy = policy.token_logprobs(ids, mask, 5, temperature=0.7, with_entropy=True)
        (logprobs.sum() + 0.3 * values.sum() + 0.1 * entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in [*policy.model.named_parameters(), *policy.value_head.named_parameters()]
                 if p.grad is not None}
        results.append((logprobs.detach(), values.detach(), entropy.detach(), grads,
                        policy.reference_logprobs(ids, mask, 5, 0.7)))
    (lp, v, ent, g, ref), (lp_full, v_full, ent_full, g_full, ref_full) = results
    torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, ref_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_full)
    torch.testing.assert_close(ent, ent_full, atol=1e-4, rtol=1e-4)
    assert g.keys() == g_full.keys() and any("lora_B" in n for n in g)
    for name in g:
        torch.testing.assert_close(g[name], g_full[name], atol=1e-5, rtol=1e-4)


def test_the_recorded_base_of_adapters_is_kept_when_it_is_a_hub_name_and_replaced_when_a_stale_path(tmp_path):
    """A run continued from a run on a hub model records that hub name: it is what the
    adapters sit on (replacing it by the recorded run would apply the first run twice)."""
    from rlhf.core.model.pretrained import trained_parts

    run = tmp_path / "run2"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"policy:\n  path: {tmp_path / 'run1'}\n")
    (run / "metrics.jsonl").write_text("")
    (run / "final").mkdir()
    from rlhf.core.run import rundir

    assert rundir.is_run(run)
    for base, expected in (("gpt2", "gpt2"), ("/gone/cache/embedded-123/policy", str(tmp_path / "run1"))):
        (run / "final" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        assert trained_parts(str(run)).trunk == expected


def test_a_batch_of_conversations_still_reaches_the_sampler():
    import random

    from rlhf_plugins.samplers.length import LengthSampler

    from rlhf.core.rollout.data import sample_queries

    sampler = LengthSampler(LengthSampler.Config(min_response_tokens=3, max_new_tokens=40))
    caps = set()
    for seed in range(20):
        sample_queries(sampler, [Rendered([1, 2, 3])], random.Random(seed))
        caps.add(sampler.generation_kwargs()["max_new_tokens"])
    assert len(caps) > 3  # drawn per batch, though no prompt was plain text


def test_a_rendered_text_prompt_from_rlhf_label_is_kept_whole(chat_models):
    policy = _policy(chat_models["qwen2"])
    long = [{"role": "user", "content": "word " * 120}]
    text = render(policy.tokenizer, long)  # what rlhf-label writes as a pair's prompt
    ids = encode_prompt(policy.tokenizer, text, max_tokens=64)
    assert isinstance(ids, Rendered) and len(ids) > 64 and policy.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_conversation_too_long_for_the_context_is_refused_before_training(tmp_path, chat_models):
    rows = [{"prompt": [{"role": "user", "content": "word " * (600 if i == 3 else 3)}]} for i in range(8)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("rlhf-train", f"policy.path={chat_models['qwen2']}", f"data.prompts={tmp_path / 'long.jsonl'}",
            "data.text_field=prompt", "data.n_eval=2", "train.steps=1", "reward=lexicon", cwd=tmp_path)
    assert r.returncode == 1
    assert "prompt 1 is" in r.stderr and "context of 512" in r.stderr and "Traceback" not in r.stderr[-800:]
