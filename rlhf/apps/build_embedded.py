"""`rlhf-build-embedded`: build (or verify) the embedded default models ahead of time."""

from __future__ import annotations

import argparse
import shutil

from rlhf.apps import hydra_setup
from rlhf.embedded.build import BuildSpec, cache_root, ensure_built


def main(argv: list[str] | None = None) -> None:
    hydra_setup.quiet_libraries()
    p = argparse.ArgumentParser(description="Build (or verify) the embedded default models.")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument("--all", action="store_true",
                   help="also the arithmetic task's models (policy.path=arithmetic, policy.path=calculator) and the toy "
                        "problem's (policy.path=toy)")
    args = p.parse_args(argv)
    spec = BuildSpec()
    if args.force:
        shutil.rmtree(cache_root() / f"embedded-{spec.key()}", ignore_errors=True)
    print(ensure_built(spec))
    if args.all:
        from rlhf.embedded import arithmetic, calculator, toy

        print(arithmetic.policy_path())
        print(calculator.policy_path())
        print(toy.toy_policy_path())


if __name__ == "__main__":
    main()
