#!/usr/bin/env bash
# Distil new students, evaluate, refuse them if worse than the current version (quality gate),
# optionally export, publish a new version to the model store. Work is in deploy/retrain.py.
#   deploy/retrain.sh --teacher models/shapes64 --version v1          # first version
#   deploy/retrain.sh --config configs/shapes64-3step.json            # retrain from the current one
#   deploy/retrain.sh --help
# Exit status: 0 published, 3 refused by the quality gate, 1 any other failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
exec "${PYTHON}" -m deploy.retrain "$@"
