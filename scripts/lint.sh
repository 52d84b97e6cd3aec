#!/usr/bin/env bash
# Static checks, as CI runs them before the tests: ruff's lint rules and formatting, and mypy on the package.
# Their configuration is in pyproject.toml; ruff and mypy come with the test extra (pip install -e ".[test]").
#   bash scripts/lint.sh          # check
#   ruff check --fix . && ruff format .   # let ruff repair what it can
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
status=0
"$PYTHON" -m ruff check . || status=1
"$PYTHON" -m ruff format --check . || status=1
"$PYTHON" -m mypy || status=1
exit $status
