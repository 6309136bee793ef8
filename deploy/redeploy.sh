#!/usr/bin/env bash
# Point the store's `current` at VERSION and reload every replica one at a time (zero downtime);
# rolls back automatically if a replica fails. Work is in deploy/redeploy.py (standard library).
#   FLASH_ADMIN_TOKEN=... deploy/redeploy.sh VERSION --replicas http://10.0.0.5:8000,http://10.0.0.6:8000
#   deploy/redeploy.sh --rollback --replicas-dns flash:8000
#   deploy/redeploy.sh --help
# Exit status: 0 every replica serves VERSION, 1 failure (rolled back when a replica failed).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
exec "${PYTHON}" -m deploy.redeploy "$@"
