#!/usr/bin/env bash
# Install (or reuse) the environment, then run the built-in demo: synthetic data, tiny VLMo
# pretraining on the CPU (about 5 minutes on 2 cores), held-out retrieval next to chance.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
exec python launchers/demo.py "$@"
