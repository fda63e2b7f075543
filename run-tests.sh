#!/usr/bin/env bash
# Everything CI runs: install, build the test guests (cached), lint, type-check, every test tier
# (unit, integration with real circusd + ZeroMQ, e2e with real QEMU guests, reliability), the
# unit and integration tiers on Python 3.13 (tests/py313.sh), and the quick benchmarks (checked
# for valid output, not for speed).
# Usage: ./run-tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"
./install.sh
export PATH="$PWD/.venv/bin:$PATH"
t0=$(date +%s)
virby guest build --arch x86_64 --variant base
virby guest build --arch x86_64 --variant nix
virby guest build --arch aarch64 --variant base
virby guest build --arch aarch64 --variant nix
ruff check .
lint-imports --no-cache  # the import contracts in .importlinter
mypy -p virby.core -p virby.guestbuild -p virby.supervisor -p virby.workers
mypy tests testing bench
python -m pytest -p no:cacheprovider -ra --durations=25 tests "$@"  # the 25 slowest: where CI time goes
# The unit and integration tiers again on Debian 13's Python 3.13 (the Mac's nixpkgs python3 is
# 3.13 too): a cached debootstrap root, ~4 min warm, ~7 min on the first run.
if [ "$(id -u)" = 0 ]; then
  tests/py313.sh
elif [ -n "${CI:-}" ]; then
  echo "run-tests: the Python 3.13 tiers need root (tests/py313.sh)" >&2; exit 1
else
  echo "run-tests: not root: skipping the Python 3.13 tiers (sudo tests/py313.sh runs them)"
fi
out=$(mktemp -d)
python -m bench --quick --out "$out"
python -m bench.validate "$out"/*.json
echo "run-tests: all green in $(( $(date +%s) - t0 ))s"
