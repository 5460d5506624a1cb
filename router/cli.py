"""``kvrouter`` command line (the router lands with its issue)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("kvrouter: error: the router is not yet available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
