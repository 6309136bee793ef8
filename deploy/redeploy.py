"""Redeploy: point `current` at a version, reload every replica one at a time, roll back on failure.

    deploy/redeploy.sh 20261127-1412     # python -m deploy.redeploy 20261127-1412
    deploy/redeploy.sh --rollback        # back to the previous version

Each replica serves `store/<family>/current` (FLASH_MODEL_DIR), so `POST /admin/reload`
re-reads through the link: the service loads and warms the new version while the old one
keeps serving, then swaps (zero downtime; a failed load leaves the old version serving).
Replicas are reloaded one after the other, each checked on /health/ready for the new
version before the next starts. If any replica fails, the pointers go back to what they
were, the replicas already touched are reloaded again (back to the old version), and the
command exits non-zero.

Replicas come from --replicas URL,URL (FLASH_REPLICAS) or --replicas-dns HOST:PORT
(FLASH_REPLICAS_DNS: every address the name resolves to, as a docker compose service name
or a Kubernetes headless Service resolves to all replicas). The admin token is read from
FLASH_ADMIN_TOKEN or --admin-token-file, never from the command line.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from deploy.store import StoreError, current, previous, read_card, restore, set_current, version_dir


class DeployError(Exception):
    """A replica that could not be moved to the wanted version."""


def http_json(method: str, url: str, token: str | None = None, body: dict | None = None, timeout: float = 10):
    """(status, parsed JSON or text); DeployError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise DeployError(f"{url}: no answer ({getattr(e, 'reason', e)})") from e
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def error_message(body) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message", str(body))
    return str(body)[:500]


def served_version(url: str) -> str | None:
    """The version a replica serves, or None if it is not ready (or not answering)."""
    try:
        status, body = http_json("GET", f"{url}/health/ready", timeout=5)
    except DeployError:
        return None
    return body.get("version") if status == 200 and isinstance(body, dict) else None


def wait_ready(url: str, version: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = served_version(url)
        if seen == version:
            return
        time.sleep(0.2)
    raise DeployError(
        f"{url} not ready with version {version} after {timeout:g} s (serves {seen or 'nothing'})"
    )


def reload(url: str, token: str, timeout: float) -> str:
    """POST /admin/reload (no body: the replica reloads its own model_dir, the `current` link)."""
    status, body = http_json("POST", f"{url}/admin/reload", token, {"wait": True}, timeout=timeout)
    if status != 200:
        raise DeployError(f"{url} refused the reload (HTTP {status}): {error_message(body)}")
    return body.get("version")


def resolve_replicas(urls: str = "", dns: str = "") -> list[str]:
    """Replica base URLs from a comma-separated list and/or every address of HOST:PORT."""
    found = [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]
    if dns:
        host, _, port = dns.rpartition(":")
        if not host or not port.isdigit():
            raise DeployError(f"--replicas-dns wants HOST:PORT, got {dns!r}")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as e:
            raise DeployError(f"cannot resolve {host}: {e}") from e
        for ip in sorted({info[4][0] for info in infos}):
            found.append(f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}")
    return list(dict.fromkeys(found))


def redeploy(
    store: str,
    family: str,
    version: str,
    replicas: list[str],
    token: str,
    timeout: float = 300,
    log: Callable[[str], None] = print,
) -> None:
    """Move every replica to `version`; on any failure restore the old version and raise DeployError."""
    if not replicas:
        raise DeployError(
            "no replicas: pass --replicas URL,URL or --replicas-dns HOST:PORT "
            "(to move the pointer only: python -m deploy.store set-current VERSION)"
        )
    expected = read_card(version_dir(store, family, version)).get("version", version)
    old, old_previous = current(store, family), previous(store, family)
    log(f"redeploy {family}: {old or 'none'} -> {version} on {len(replicas)} replica(s)")
    not_ready = [r for r in replicas if served_version(r) is None]
    if not_ready:
        raise DeployError(
            f"not ready before the deploy: {', '.join(not_ready)}; nothing was changed "
            "(fix them, or leave them out of the replica list)"
        )
    set_current(store, family, version)
    touched: list[str] = []
    try:
        for i, url in enumerate(replicas, 1):
            start = time.monotonic()
            log(f"[{i}/{len(replicas)}] {url}: reloading")
            touched.append(url)
            got = reload(url, token, timeout)
            if got != expected:
                raise DeployError(
                    f"{url} serves version {got} after the reload, expected {expected}: "
                    f"is its FLASH_MODEL_DIR the store's {family}/current link?"
                )
            wait_ready(url, expected, timeout)
            log(f"[{i}/{len(replicas)}] {url}: ready, serving {expected} ({time.monotonic() - start:.1f} s)")
    except DeployError as e:
        log(f"FAILED: {e}")
        raise DeployError(
            f"redeploy to {version} failed: {e}; {rollback(store, family, old, old_previous, touched, token, timeout, log)}"
        ) from e
    log(f"done: {len(replicas)} replica(s) serve {expected}")


def rollback(
    store: str,
    family: str,
    old: str | None,
    old_previous: str | None,
    touched: list[str],
    token: str,
    timeout: float,
    log: Callable[[str], None],
) -> str:
    """Restore the pointers and reload the replicas already touched; returns what happened."""
    restore(store, family, old, old_previous)
    if old is None:
        return "there was no version before it: `current` removed, the replicas keep what they load"
    expected = read_card(version_dir(store, family, old)).get("version", old)
    log(f"rolling back to {old} on {len(touched)} replica(s)")
    problems = []
    for url in touched:
        try:
            if reload(url, token, timeout) != expected:
                raise DeployError(f"{url} did not return to {expected}")
            wait_ready(url, expected, timeout)
            log(f"rolled back {url}: serving {expected}")
        except DeployError as e:
            problems.append(str(e))
    if problems:
        return f"rolled back the pointer to {old} but not every replica: {'; '.join(problems)}"
    return f"rolled back to {old} (every replica serves {expected})"


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="deploy/redeploy.sh",
        description="Point the store's `current` at VERSION and reload every replica (zero downtime); "
        "rolls back automatically if a replica fails.",
        epilog="examples:\n  FLASH_ADMIN_TOKEN=... deploy/redeploy.sh 20261127-1412 --replicas http://10.0.0.5:8000,http://10.0.0.6:8000\n"
        "  deploy/redeploy.sh --rollback --replicas-dns flash:8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", help="published version to deploy")
    which.add_argument("--rollback", action="store_true", help="deploy the previous version")
    p.add_argument("--store", default=env.get("FLASH_STORE", "store"), help="store folder (FLASH_STORE)")
    p.add_argument("--family", default=env.get("FLASH_FAMILY", "shapes64"), help="family (FLASH_FAMILY)")
    p.add_argument("--replicas", default=env.get("FLASH_REPLICAS", ""), help="URL,URL (FLASH_REPLICAS)")
    p.add_argument(
        "--replicas-dns", default=env.get("FLASH_REPLICAS_DNS", ""), help="HOST:PORT (FLASH_REPLICAS_DNS)"
    )
    p.add_argument(
        "--admin-token-file", default=None, help="file holding the admin token (else FLASH_ADMIN_TOKEN)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(env.get("FLASH_REDEPLOY_TIMEOUT", 300)),
        help="seconds per replica for load + warm-up + ready (default %(default)s)",
    )
    a = p.parse_args(argv)
    try:
        token = (
            open(a.admin_token_file).read().strip()
            if a.admin_token_file
            else env.get("FLASH_ADMIN_TOKEN", "")
        )
        if not token:
            raise DeployError("no admin token: set FLASH_ADMIN_TOKEN or pass --admin-token-file")
        version = a.version
        if a.rollback:
            version = previous(a.store, a.family)
            if version is None:
                raise DeployError(
                    f"no previous version recorded in {a.store}/{a.family}: nothing to roll back to"
                )
        redeploy(a.store, a.family, version, resolve_replicas(a.replicas, a.replicas_dns), token, a.timeout)
    except (DeployError, StoreError, OSError) as e:
        print(f"redeploy: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
