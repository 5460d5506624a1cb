"""The code is formatted by ``ruff format`` as it is, and passes ``ruff check``.

No hand alignment: a file that ``ruff format`` would change fails here, so the formatter,
not a reviewer, settles layout (``pip install ruff`` comes with the test extra).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ESCAPES = ("# fmt: " + "skip", "# fmt: " + "off")  # spelled apart, so this file passes


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_format_leaves_every_file_as_it_is() -> None:
    run = _ruff("format", "--check", ".")
    assert run.returncode == 0, "run `ruff format .`:\n" + run.stdout + run.stderr


def test_ruff_check_finds_nothing() -> None:
    run = _ruff("check", ".")
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_hand_alignment_escapes() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()  # the project's files, not a virtualenv's
    skips = [
        f"{name}:{i}"
        for name in tracked
        for i, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if any(escape in line for escape in ESCAPES)
    ]
    assert not skips, "formatter escapes (let ruff format lay it out): " + ", ".join(skips[:20])
