"""Container health check: exit 0 when the server in this container answers GET /readyz with 200.

Reads the same THINKINGVIT_HOST / THINKINGVIT_PORT variables as the server, so a port changed by
configuration is checked too. Standard library only: it runs every few seconds.
"""
import os
import sys
import urllib.error
import urllib.request


def readyz_url() -> str:
    host = os.environ.get("THINKINGVIT_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::"):  # listening on every interface: ask over loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('THINKINGVIT_PORT', '8000')}/readyz"


def main() -> int:
    url = readyz_url()
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "2"))) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
