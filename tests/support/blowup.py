"""Catching an algorithmic blow-up without timing a test.

That some input is handled in linear time cannot be checked with a speed threshold on a shared,
noisy machine. Instead the test's input is made so large that the quadratic or exponential
behaviour it guards against would run for half an hour or more, while the linear code needs
about a second, and the work runs in a child process that is given minutes: only a blow-up by
orders of magnitude fails, never a slow moment of the machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENEROUS_SECONDS = 300.0


def run_to_completion(snippet: str, *args: str) -> str:
    """Run ``snippet`` (Python, with ``sys.argv[1:]`` = ``args``) in a child process with the
    repository importable; return what it printed. Fails the test if it does not finish in
    GENEROUS_SECONDS or fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", snippet, *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=GENEROUS_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish in {GENEROUS_SECONDS:.0f} s: a blow-up, not a slow machine")
    assert done.returncode == 0, done.stderr
    return done.stdout
