"""Start a server as a real subprocess and wait for the line that says it is ready."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time


def spawn_until_ready(
    argv: list[str], ready: re.Pattern, what: str, timeout: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, re.Match]:
    """``argv`` started with its output piped; returns it and the match of ``ready`` on
    its first matching line, or kills it and raises with the output seen so far."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env)  # fmt: skip
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.5)
        if readable:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            m = ready.search(line)
            if m:
                return proc, m
        elif proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{what} did not start: {''.join(seen)[-3000:]}")
