#!/usr/bin/env bash
# Install (or reuse) the environment, then run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
exec python -m pytest -q tests "$@"
