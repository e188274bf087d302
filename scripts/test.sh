#!/usr/bin/env bash
# Set up .venv, lint, then run the whole test suite. Extra arguments go to pytest.
# Exits non-zero when anything fails, including pytest's exit code 5 (no test collected).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$VENV_PY" -m ruff check .
set +e
# two pytest-xdist workers, one test module at a time each (module fixtures built once): much
# of the suite waits on Ray, servers and subprocesses; FRAME_DIST_TEST_WORKERS=0 runs serially
"$VENV_PY" -m pytest -n "${FRAME_DIST_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no test: failing" >&2
fi
exit "$rc"
