#!/usr/bin/env bash
# The main job: set up .venv, then run the pipeline on the bundled synthetic micro-video world
# on a local Ray instance. Idempotent: a second run skips the stages already committed.
# Extra arguments are config overrides, e.g. scripts/demo.sh graph.n_clips=8
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV_PY" -m jobs.pipeline --config configs/demo.yaml "$@"
