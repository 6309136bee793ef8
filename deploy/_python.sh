# Sourced by the deploy scripts: the repository root on PYTHONPATH and the Python to run.
# PYTHON overrides; else the project's .venv, else python3 on PATH (the service image's venv).
DEPLOY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${DEPLOY_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${DEPLOY_ROOT}/.venv/bin/python" ]]; then
        PYTHON="${DEPLOY_ROOT}/.venv/bin/python"
    else
        PYTHON="$(command -v python3 || command -v python || true)"
    fi
fi
if [[ -z "${PYTHON}" ]]; then
    echo "$(basename "$0"): error: no python found (set PYTHON)" >&2
    exit 1
fi
