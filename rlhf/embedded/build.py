"""Build the embedded default offline: tokenizer, SFT policy and sentiment classifier.

Everything comes from the review generator in `corpus.py`, deterministically from a
seed. The result is cached under `$RLHF_HOME/embedded-<key>` (or
`$XDG_CACHE_HOME/rlhf/...`, or `~/.cache/rlhf/...`) with a manifest of file hashes;
a missing or damaged cache is rebuilt. Build into a temporary directory and rename,
so a killed build never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.embedded import corpus

VERSION = 3  # bump when the build recipe changes: old caches are then ignored (3: targets checked, recorded)
EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
LABEL_NAMES = ("NEGATIVE", "NEUTRAL", "POSITIVE")  # same order as corpus.LABELS


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 0
    n_reviews: int = 8000  # training reviews for the policy and the classifier
    vocab_size: int = 1024
    policy_steps: int = 800
    classifier_steps: int = 300
    batch_size: int = 32
    # targets each part is checked against on reviews it never saw (another seed of the generator);
    # a part short of its target trains on, a tenth of its steps at a time, up to twice its steps
    policy_loss_target: float = 1.35  # nats per token (measured 1.22 after 800 steps)
    classifier_accuracy_target: float = 0.95  # (measured 0.998 after 300 steps)
    held_out: int = 500  # reviews of seed + 1000 for those checks

    def key(self) -> str:
        blob = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    if os.environ.get("RLHF_HOME"):
        return Path(os.environ["RLHF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "rlhf"


def ensure_built(spec: BuildSpec = BuildSpec(), quiet: bool = False) -> Path:
    """Path of a complete build for `spec`, building it first if missing or damaged."""
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"embedded-{spec.key()}"
    if _is_complete(target):
        return target
    with FileLock(str(target) + ".lock"):  # parallel sweep jobs build once
        if _is_complete(target):
            return target
        if target.exists():  # said even when quiet: a cache that changed under us is news
            print(f"[rlhf] the embedded default at {target} is damaged ({_damage(target)}); rebuilding it",
                  file=sys.stderr, flush=True)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            t0 = time.time()
            if not quiet:
                print(f"[rlhf] building the embedded default into {target} (one time, about 90 s on 2 cores)")
            with own_random_state():  # a run that builds first trains as every later run does
                reached = _build(spec, tmp, quiet)
            _write_manifest(tmp, spec, time.time() - t0, reached)
            os.replace(tmp, target)
            if not quiet:
                print(f"[rlhf] built in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in reached.items()))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def policy_path(spec: BuildSpec = BuildSpec()) -> str:
    return str(ensure_built(spec) / "policy")


def sentiment_path(spec: BuildSpec = BuildSpec()) -> str:
    return str(ensure_built(spec) / "sentiment")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")


def _write_manifest(d: Path, spec: BuildSpec, seconds: float, reached: dict) -> None:
    files = {str(p.relative_to(d)): _hash(p) for p in _files(d)}
    manifest = {"spec": asdict(spec), "version": VERSION, "build_s": round(seconds, 1), "reached": reached, "files": files}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _damage(d: Path) -> str:
    """What is wrong with a build directory, for the rebuild message."""
    try:
        files = json.loads((d / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest.json"
    for f, h in files.items():
        if not (d / f).is_file():
            return f"{f} is missing"
        if _hash(d / f) != h:
            return f"{f} differs from its manifest"
    return "incomplete"


def cached_model(name: str, build, message: str | None = None) -> str:
    """`<cache>/<name>`, built by `build(directory)` on first use (or when its weights are
    missing): under a lock, so parallel jobs build once, into a temporary directory renamed
    into place, with the caller's random state left as it was."""
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
            try:
                t0 = time.time()
                if message:
                    print(f"[rlhf] {message} into {target}", flush=True)
                with own_random_state():  # the run that builds it trains as every later run does
                    build(tmp)
                tmp.replace(target)
                if message:
                    print(f"[rlhf] built in {time.time() - t0:.0f} s", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@contextlib.contextmanager
def own_random_state():
    """Python's, NumPy's and torch's random states as they were before, afterwards."""
    import random

    import numpy as np
    import torch

    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


def _is_complete(d: Path) -> bool:
    try:
        files = json.loads((d / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((d / f).is_file() and _hash(d / f) == h for f, h in files.items())


# ---------------------------------------------------------------------------- build


class TargetNotReached(RuntimeError):
    """A part of a build stayed short of the target it is checked against."""


def _build(spec: BuildSpec, out: Path, quiet: bool) -> dict:
    """Build every part into `out`; returns what each reached on held-out reviews."""
    import torch

    torch.manual_seed(spec.seed)
    data = corpus.reviews(spec.n_reviews, seed=spec.seed)
    held_out = corpus.reviews(spec.held_out, seed=spec.seed + 1000)
    tokenizer = _train_tokenizer([t for t, _ in data], spec.vocab_size)
    reached = {"policy_held_out_loss": _train_policy(spec, tokenizer, [t for t, _ in data], held_out, out / "policy", quiet)}
    reached["classifier_held_out_accuracy"] = _train_classifier(spec, tokenizer, data, held_out, out / "sentiment", quiet)
    (out / "corpus_sample.txt").write_text("\n".join(f"{lab}\t{t}" for t, lab in data[:50]) + "\n")
    return reached


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=128,
    )


def _batches(encoded: list[list[int]], batch_size: int, pad_id: int, steps: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((batch_size, width), pad_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        yield idx, ids, mask


def _fit(model, batches, steps: int, lr: float, loss_fn, what: str, quiet: bool, measure, good) -> float:
    """One-cycle training for `steps`, then `measure(model)` until `good(value)`: a part short of
    its target trains on at a tenth of `lr`, steps / 10 at a time, up to `steps` more (so a build
    does not hinge on the last digits of the floating-point arithmetic). Returns the value reached."""
    import itertools

    import torch
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(total=steps, desc=f"[rlhf] {what}", disable=quiet, mininterval=2)
    done, budget = 0, steps

    def train(n: int, schedule) -> None:
        nonlocal done
        model.train()
        for batch in itertools.islice(batches, n):
            loss = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if schedule is not None:
                schedule.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            done += 1
        model.eval()

    train(steps, sched)
    value = measure(model)
    while not good(value) and done < steps + budget:
        for group in opt.param_groups:
            group["lr"] = lr / 10
        train(max(1, steps // 10), None)
        value = measure(model)
    bar.close()
    if not good(value):
        raise TargetNotReached(f"the embedded {what} reached {value:.4f} after {done} steps, short of its target")
    return round(value, 4)


def _train_policy(spec: BuildSpec, tokenizer, texts: list[str], held_out, out: Path, quiet: bool) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=2, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    def loss_fn(model, batch):
        _, ids, mask = batch
        labels = ids.masked_fill(mask == 0, -100)  # padding is not a target; EOS is
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def held_out_loss(model) -> float:  # nats per predicted token, EOS included
        import torch

        rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t, _ in held_out]
        with torch.no_grad():
            total = sum(float(model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss) * (len(r) - 1) for r in rows)
        return total / sum(len(r) - 1 for r in rows)

    batches = _batches(encoded, spec.batch_size, tokenizer.pad_token_id, 2 * spec.policy_steps, spec.seed)
    loss = _fit(model, batches, spec.policy_steps, 3e-3, loss_fn, "SFT policy", quiet, held_out_loss,
                lambda v: v <= spec.policy_loss_target)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return loss


def _train_classifier(spec: BuildSpec, tokenizer, data, held_out, out: Path, quiet: bool) -> float:
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, dim=64, hidden_dim=128,
        n_layers=2, n_heads=4, pad_token_id=tokenizer.pad_token_id, num_labels=3,
        id2label=dict(enumerate(LABEL_NAMES)), label2id={n: i for i, n in enumerate(LABEL_NAMES)},
    )
    model = DistilBertForSequenceClassification(config)
    encoded = [tokenizer(t)["input_ids"] for t, _ in data]
    labels = torch.tensor([corpus.LABELS.index(lab) for _, lab in data])

    def loss_fn(model, batch):
        idx, ids, mask = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels[idx]).loss

    def held_out_accuracy(model) -> float:
        with torch.no_grad():
            right = sum(int(model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits.argmax(-1))
                        == corpus.LABELS.index(lab) for t, lab in held_out)
        return right / len(held_out)

    batches = _batches(encoded, spec.batch_size, tokenizer.pad_token_id, 2 * spec.classifier_steps, spec.seed + 1)
    accuracy = _fit(model, batches, spec.classifier_steps, 2e-3, loss_fn, "sentiment classifier", quiet, held_out_accuracy,
                    lambda v: v >= spec.classifier_accuracy_target)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return accuracy
