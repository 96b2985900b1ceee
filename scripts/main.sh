#!/usr/bin/env bash
# The main job on the embedded default, after installing what is missing:
#   bash scripts/main.sh                      # rlhf-train with its defaults
#   bash scripts/main.sh optimizer=dpo        # any rlhf-train overrides
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
rlhf-train "$@"
