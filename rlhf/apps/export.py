"""`rlhf-export`: a trained run as a folder anyone can load without this project.

    rlhf-export <run> <dir>              # a standalone transformers model: LoRA merged into the weights
    rlhf-export <run> <dir> --adapters   # the adapters alone, for PeftModel.from_pretrained(base, <dir>)

Either way the folder also holds the tokenizer (its chat template too), the generation
config (every end token) and a model card (README.md: the run's config, figures and
reward-KL curve). With --adapters, a base that is not a hub name (the embedded model, a
toy, a local directory) is copied to <dir>/base, and the adapters name that copy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rlhf.apps import hydra_setup
from rlhf.core.run import rundir


def export(run: Path, out: Path, adapters: bool) -> Path:
    """Write the export of `run` (a run directory or its final/) into the new folder `out`."""
    import json

    from rlhf.core.model.pretrained import load_model, portable_name, recorded_config, trained_parts
    from rlhf.core.run import card

    run_dir = run if rundir.is_run(run) else run.parent if rundir.is_run(run.parent) else None
    parts = trained_parts(str(run))
    if run_dir is None or parts is None:
        raise ValueError(f"{run}: not a run directory of rlhf-train (nor its final/); export takes a finished run")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; name a new folder (nothing was written)")
    if adapters and parts.adapters is None:
        raise ValueError(f"{run} trained every weight (policy.lora.enabled=false): there are no adapters to export; "
                         "drop --adapters for the whole model")
    cfg = recorded_config(str(run))  # the run's revision, dtype and trust_remote_code
    with rundir.atomic_dir(out) as partial:
        partial = Path(partial)
        if adapters:
            from transformers import AutoTokenizer

            for f in parts.adapters.iterdir():
                if f.name.startswith("adapter_") or f.name == rundir.VALUE_HEAD:
                    shutil.copy2(f, partial / f.name)
            AutoTokenizer.from_pretrained(str(parts.adapters)).save_pretrained(partial)
            base = portable_name(parts.trunk)
            if trained_parts(base) is not None or not _is_hub_name(base):  # a base on this machine goes along
                model, _ = load_model(parts.trunk, cfg)
                model.save_pretrained(partial / "base", safe_serialization=True)
                AutoTokenizer.from_pretrained(str(parts.adapters)).save_pretrained(partial / "base")
                base = str((out / "base").resolve())
            record = json.loads((partial / rundir.ADAPTER_CONFIG).read_text())
            record["base_model_name_or_path"] = base
            (partial / rundir.ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
            card.write(run_dir, partial, "adapters", base=base)
        else:
            model, tokenizer = load_model(str(run), cfg)
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            card.write(run_dir, partial, "model", base=parts.trunk if _is_hub_name(parts.trunk) else None)
    return out


def _is_hub_name(name: str) -> bool:
    """A hub repository id (owner/name or name), not something only this machine has."""
    from rlhf.core.model.pretrained import is_built_here

    return not (is_built_here(name) or Path(name).expanduser().exists())


def main(argv: list[str] | None = None) -> int:
    hydra_setup.quiet_libraries()
    p = argparse.ArgumentParser(prog="rlhf-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory of rlhf-train (or its final/)")
    p.add_argument("out", help="a new folder to write")
    p.add_argument("--adapters", action="store_true", help="the LoRA adapters alone (and the base, if not on the hub)")
    args = p.parse_args(argv)
    try:
        out = export(Path(args.run).expanduser(), Path(args.out).expanduser(), args.adapters)
    except (OSError, ValueError) as e:
        print(f"rlhf-export: {e}", file=sys.stderr)
        return 1
    print(f"rlhf-export: {'adapters' if args.adapters else 'merged model'} of {args.run} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
