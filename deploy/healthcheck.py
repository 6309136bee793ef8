"""The container's health check: GET /health/live (--ready: /health/ready) on FLASH_PORT; exit 0 or 1.

The image has no curl; this is the standard library. `docker inspect` shows the last output.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = "/health/ready" if "--ready" in argv else "/health/live"
    url = f"http://127.0.0.1:{os.environ.get('FLASH_PORT', '8000')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            return 0 if r.status == 200 else 1
    except Exception as e:  # any failure is "unhealthy", with the reason for docker inspect
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
