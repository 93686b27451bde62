"""The GPU's paged decode attention checked on the CPU: tests/unit/triton_decode_cases.py run under Triton's
interpreter, in a process of its own (the interpreter must be chosen before Triton is first imported, and
other tests import it through xgrammar)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from seesaw_ds.model import triton_decode

CASES = Path(__file__).with_name("triton_decode_cases.py")


def test_the_paged_decode_kernel_under_tritons_interpreter():
    assert triton_decode.available(), "Triton is missing: xgrammar, a dependency, installs it"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                            cwd=CASES.parents[2], timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 20, result.stdout[-2000:]
    assert "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
