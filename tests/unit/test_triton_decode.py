"""The GPU's paged decode attention checked on the CPU: tests/unit/triton_decode_cases.py run under Triton's
interpreter, in a process of its own (the interpreter must be chosen before Triton is first imported, and
other tests import it through xgrammar); here too, without Triton, the partition counts the kernels are
launched (compiled) with."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

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


def test_the_launch_partition_count_is_a_power_of_two():
    """The partition count is a compile-time constant of both kernels: rounded up to a power of two, a decode
    whose longest sequence grows meets a new compiled variant only when it doubles (not every 512 tokens)."""
    assert [triton_decode.launch_partitions(length, 16) for length in (1, 512, 513, 1024, 1025, 2048, 2049, 4097)] \
        == [1, 1, 2, 2, 4, 4, 8, 16]
    assert triton_decode.partitions(1025, 16) == 3 and triton_decode.partitions(2049, 16) == 5
    counts = {triton_decode.launch_partitions(length, 16) for length in range(1, 64 * 512)}
    assert counts == {1, 2, 4, 8, 16, 32, 64}
    assert all(triton_decode.launch_partitions(length, 4, 2) == 1 for length in range(1, 9))   # one: direct store


class _Launcher:
    """A stand-in for a Triton kernel: ``kernel[grid](*args, **constexprs)`` recorded, nothing run."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((grid, args, constexprs))


def test_a_growing_decode_launches_only_power_of_two_partition_variants(monkeypatch):
    """Token by token over 40 blocks at 2 blocks a partition (20 partitions at the end): every launch's grid,
    PARTS and partial buffers use the rounded count, the merge runs exactly where it is over 1, and the kernels
    meet 6 distinct partition counts, not 20."""
    attend, merge = _Launcher(), _Launcher()
    monkeypatch.setattr(triton_decode, "_kernels", lambda: (attend, merge))
    block, n, heads, kv_heads, dim = 4, 2, 4, 2, 8
    query = torch.zeros(n, heads, dim)
    cache = torch.zeros(40 * block, kv_heads, dim)
    table = torch.zeros(n, 40, dtype=torch.long)
    for length in range(1, 40 * block + 1):
        triton_decode.paged_decode_attention(query, cache, cache, table, torch.tensor([length, 1]), length, block,
                                             0.25, blocks_per_part=2)
    seen = set()
    merged = iter(merge.launches)
    for grid, args, constexprs in attend.launches:
        parts = constexprs["PARTS"]
        assert grid == (n, kv_heads, parts)
        seen.add(parts)
        if parts > 1:
            assert args[6].shape == (n * heads * parts,) and args[8].shape == (n * heads * parts, dim)
            merge_grid, _, merge_constexprs = next(merged)
            assert merge_grid == (n, heads) and merge_constexprs["PARTS"] == merge_constexprs["PARTS_P"] == parts
    assert next(merged, None) is None
    assert seen == {1, 2, 4, 8, 16, 32}
