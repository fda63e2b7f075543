#!/usr/bin/env bash
# Everything CI runs: install, build the test guests (cached), lint, type-check, every test tier
# (unit, integration with real circusd + ZeroMQ, e2e with real QEMU guests, reliability), and
# the quick benchmarks (checked for valid output, not for speed).
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
mypy -p virby.supervisor -p virby.workers
mypy tests bench
python -m pytest -p no:cacheprovider -ra tests "$@"
out=$(mktemp -d)
python -m bench --quick --out "$out"
python -m bench.validate "$out"/*.json
echo "run-tests: all green in $(( $(date +%s) - t0 ))s"
