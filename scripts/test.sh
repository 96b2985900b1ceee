#!/usr/bin/env bash
# The lint and the test suite, after installing what is missing (CI runs exactly this):
#   bash scripts/test.sh                      # ruff, then every test
#   bash scripts/test.sh tests/test_layout.py # ruff, then the tests named (any pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh --test
# the set this run tests: constraints.txt exactly (RLHF_UNPINNED=1: what pip resolved, listed)
if [[ "${RLHF_UNPINNED:-0}" == 1 ]]; then pip freeze --exclude-editable | tr '\n' ' '; echo; else python scripts/pins.py check; fi
ruff check .
# the one-time model builds first, on every core (each test worker has one thread): the workers
# then never wait on a build's lock
rlhf-build-embedded --all >/dev/null
pytest "$@"
