# Sourced by scripts/install, scripts/serve and scripts/test: the interpreter that runs the project.
# A virtual environment in .venv, created and reused by scripts/install; THINKINGVIT_VENV=DIR puts
# it elsewhere, THINKINGVIT_VENV= (empty) uses the base interpreter itself (e.g. in a container).
# PYTHON is the base interpreter (default python3).
BASE_PYTHON=${PYTHON:-python3}
VENV=${THINKINGVIT_VENV-.venv}
if [ -n "$VENV" ]; then PY="$VENV/bin/python"; else PY="$BASE_PYTHON"; fi
