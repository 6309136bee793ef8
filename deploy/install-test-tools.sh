#!/usr/bin/env bash
# Install the system tools the deploy tests run, when they are missing: nginx (the load
# balancer of tests/test_deploy_topology.py) and promtool (Debian `prometheus`).
# Idempotent (does nothing when both are there); skipped when not root, without apt-get,
# or with FLASH_SKIP_TOOL_INSTALL=1 -- the tests that need a missing tool then skip with a reason.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
if [[ -n "${FLASH_SKIP_TOOL_INSTALL:-}" || "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: not installing ${missing[*]} (not root, no apt-get, or FLASH_SKIP_TOOL_INSTALL set); the tests that need them will skip"
    exit 0
fi
echo "install-test-tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "install-test-tools: apt-get failed; the tests that need ${missing[*]} will skip" >&2
fi
