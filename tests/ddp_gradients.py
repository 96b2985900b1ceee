"""One gradient of an optimizer's loss on a fixed global batch with ragged responses, as one
process or as one rank of several (started with torchrun's environment by
test_update.py): rank 0 (or the one process) saves every trained parameter's gradient.

    python tests/ddp_gradients.py <optimizer> <out.pt>
"""

from __future__ import annotations

import sys

import torch


def main(name: str, out: str) -> None:
    from omegaconf import OmegaConf

    from rlhf.contracts import registry, schema
    from rlhf.core.model.policy import Policy
    from rlhf.core.parallel import distributed
    from rlhf.core.rollout import collect

    distributed.setup()
    torch.set_num_threads(1)
    cfg = schema.compose(["+experiment=toy_sequences", f"optimizer={name}", "sampler.max_new_tokens=3"])
    objective = registry.instantiate("optimizer", cfg.optimizer)
    reward = registry.instantiate("reward", cfg.reward)
    sampler = registry.instantiate("sampler", cfg.sampler)
    torch.manual_seed(0)
    policy = Policy.load(OmegaConf.to_object(cfg.policy), torch.device("cpu"))
    if objective.needs_value_head:
        policy.attach_value_head()
        torch.nn.init.normal_(policy.value_head.weight, std=0.1)  # a critic that predicts something
    k = objective.samples_per_prompt
    prompts = [policy.tokenizer(x, add_special_tokens=False).input_ids for x in ("x0", "x1", "x2", "x0")]
    queries = [q for q in prompts for _ in range(k)]  # each prompt's k samples side by side
    torch.manual_seed(1)
    batch = collect.collect(policy, reward, queries, sampler.generation_kwargs(), sampler.temperature)  # the same on every rank
    lengths = batch.mask.sum(1).tolist()
    assert len(set(lengths)) > 1, lengths  # ragged: the reduction rule is what this tests
    if distributed.active():  # this rank's share of the global batch: whole prompt groups, in order
        start, stop = distributed.shard(len(prompts))
        batch, _ = collect.minibatch(batch, torch.arange(start * k, stop * k))
        policy.enable_data_parallel()
    policy.train()
    prepared = objective.prepare(batch)
    objective.loss(policy, batch, prepared, 0).loss.backward()  # (DDP averages the ranks' gradients here)
    if distributed.is_main():
        torch.save({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad} | (
            {f"value_head.{n}": p.grad.clone() for n, p in policy.value_head.named_parameters()}
            if policy.value_head is not None else {}), out)
    distributed.barrier()
    if distributed.active():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
