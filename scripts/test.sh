#!/usr/bin/env bash
# Installs what the tests need and runs them (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=smollm2 bash scripts/install.sh
python3 -m pytest -q -p no:cacheprovider "$@"
