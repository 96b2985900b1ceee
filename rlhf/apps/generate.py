"""`rlhf-generate`: sample from a trained policy (a run directory, its final/, or any model).

    rlhf-generate outputs/2026-11-30/14-00-00-123 "The movie was"      # one prompt, one response
    rlhf-generate <run> "What is 7 + 5?" -n 4 --temperature 0.7       # four samples
    rlhf-generate <run>                                                # interactive: a prompt a line
    rlhf-generate <run> --episode                                      # an episode: you are the environment

The sampling settings default to the run's own (`.hydra/config.yaml`'s sampler). A model
with a chat template gets the prompt as a user message, rendered with the template and its
generation prompt (`--raw` gives the text as it is). With `--episode`, you play the
environment of an episode: after the first prompt, each line you type is the environment's
answer to the policy's last turn, appended as tokens (the chat template's markers for a new
message), and the policy takes the next turn; an empty line ends the episode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.apps import hydra_setup
from rlhf.core.run import rundir


def sampling_settings(path: Path, args: argparse.Namespace) -> dict:
    """The run's sampler settings (if `path` is a run), then the command line's."""
    gen = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 48}
    run = path if rundir.is_run(path) else path.parent if rundir.is_run(path.parent) else None
    if run is not None:
        from omegaconf import OmegaConf

        sampler = OmegaConf.load(run / rundir.CONFIG).get("sampler") or {}
        gen.update({k: sampler[k] for k in gen if k in sampler})
    for key in ("temperature", "top_k", "top_p", "max_new_tokens"):
        if getattr(args, key) is not None:
            gen[key] = getattr(args, key)
    if args.greedy:
        gen["do_sample"] = False
    return gen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Without a prompt: interactive, a prompt a line (an empty line or Ctrl-D ends).")
    p.add_argument("policy", help="a run directory of rlhf-train, its final/, a model directory, 'embedded' or a hub name")
    p.add_argument("prompt", nargs="?", help="the prompt; omit for interactive mode")
    p.add_argument("-n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--greedy", action="store_true", help="the most likely token each step")
    p.add_argument("--raw", action="store_true", help="the prompt as text, even if the model has a chat template")
    p.add_argument("--episode", action="store_true",
                   help="interactive episode: you answer the policy's turns as its environment (an empty line ends it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


class Generator:
    def __init__(self, policy_path: str, device: str, raw: bool):
        import torch

        from rlhf.core.model.policy import Policy
        from rlhf.core.model.pretrained import recorded_config
        from rlhf.core.parallel.distributed import pick_device

        torch.set_grad_enabled(False)  # the run's revision, dtype and trust_remote_code, as it trained
        self.policy = Policy.load_trained(recorded_config(policy_path), pick_device(device))
        self.chat = bool(getattr(self.policy.tokenizer, "chat_template", None)) and not raw

    def __call__(self, prompt: str, gen: dict, n: int) -> list[str]:
        from rlhf.core.rollout import collect, sampling
        from rlhf.core.rollout.data import encode_prompt

        query = encode_prompt(self.policy.tokenizer, [{"role": "user", "content": prompt}] if self.chat else prompt,
                              max_tokens=10**6)
        if not query:
            raise ValueError("the prompt has no tokens; the first response token needs a context")
        g = sampling.generate(self.policy, [list(query)] * n, gen)
        return collect.decode(self.policy, g.input_ids, g.attention_mask, g.query_len)[1]

    def episode(self, prompt: str, gen: dict, read, write) -> list[int]:
        """An episode with the user as the environment: the policy's turns, `read()`'s answers
        appended as tokens (token in, token out: nothing is rendered again), until an empty answer."""
        from rlhf.core.rollout import sampling
        from rlhf.core.rollout.episodes import first_query, observation_ids

        tok = self.policy.tokenizer
        ids = first_query(tok, prompt) if self.chat else tok(prompt, add_special_tokens=False)["input_ids"]
        while True:
            g = sampling.generate(self.policy, [ids], gen)
            turn = g.input_ids[0, g.query_len:][g.mask[0].bool()].tolist()
            ids = ids + turn
            write(tok.decode(turn, skip_special_tokens=True))
            answer = read()
            if not answer.strip():
                return ids
            ids = ids + (observation_ids(tok, answer) if self.chat else tok(answer, add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    hydra_setup.quiet_libraries()
    args = build_parser().parse_args(argv)
    for name, value, ok, want in (("-n", args.n, args.n >= 1, "at least 1"),
                                  ("--temperature", args.temperature, args.temperature is None or args.temperature > 0, "> 0"),
                                  ("--max-new-tokens", args.max_new_tokens,
                                   args.max_new_tokens is None or args.max_new_tokens >= 1, "at least 1")):
        if not ok:
            print(f"rlhf-generate: {name}={value} must be {want}", file=sys.stderr)
            return 2
    import torch

    torch.manual_seed(args.seed)
    try:
        gen = sampling_settings(Path(args.policy).expanduser(), args)
        generator = Generator(args.policy, args.device, args.raw)
    except (OSError, ValueError) as e:
        print(f"rlhf-generate: {e}", file=sys.stderr)
        return 1
    if args.episode:
        return play_episodes(generator, gen, args.prompt)
    prompts = [args.prompt] if args.prompt is not None else None
    interactive = prompts is None
    if interactive:
        print(f"rlhf-generate: {args.policy} ({'chat template' if generator.chat else 'plain text'}); "
              "a prompt a line, an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)  # the prompt sign apart from the responses
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                line = ""
            if not line.strip():  # an empty line, Ctrl-D or Ctrl-C
                print(file=sys.stderr)
                return 0
            prompt = line.rstrip("\n")
        else:
            if not prompts:
                return 0
            prompt = prompts.pop()
        try:
            responses = generator(prompt, gen, args.n)
        except ValueError as e:
            print(f"rlhf-generate: {e}", file=sys.stderr)
            if not interactive:
                return 1
            continue
        for i, text in enumerate(responses):
            print(f"[{i + 1}] {text}" if args.n > 1 else text, flush=True)


def play_episodes(generator: Generator, gen: dict, prompt: str | None) -> int:
    """Episodes with the user as the environment, one after another (an empty prompt ends)."""
    def read() -> str:
        print("env> ", end="", file=sys.stderr, flush=True)
        try:
            return sys.stdin.readline().rstrip("\n")
        except KeyboardInterrupt:
            return ""

    print("rlhf-generate: an episode: type the environment's answer to each turn; an empty line ends the episode",
          file=sys.stderr)
    while True:
        if prompt is None:
            print("prompt> ", end="", file=sys.stderr, flush=True)
            prompt = sys.stdin.readline().rstrip("\n")
            if not prompt.strip():
                print(file=sys.stderr)
                return 0
        try:
            generator.episode(prompt, gen, read, lambda text: print(f"policy: {text}", flush=True))
        except ValueError as e:  # (a context the episode outgrew)
            print(f"rlhf-generate: {e}", file=sys.stderr)
        prompt = None


if __name__ == "__main__":
    sys.exit(main())
