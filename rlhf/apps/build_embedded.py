"""`rlhf-build-embedded`: build (or verify) the embedded default models ahead of time."""

from __future__ import annotations

import argparse
import shutil

from rlhf.embedded.build import BuildSpec, cache_root, ensure_built


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build (or verify) the embedded default models.")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = p.parse_args(argv)
    spec = BuildSpec()
    if args.force:
        shutil.rmtree(cache_root() / f"embedded-{spec.key()}", ignore_errors=True)
    print(ensure_built(spec))


if __name__ == "__main__":
    main()
