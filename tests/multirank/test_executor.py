"""Executor on real MPI ranks (gloo, DeepSpeed's CPU accelerator): every static layout of 1, 2 and 4 ranks
and ten layout switches, logits within 1e-4 of plain transformers and identical greedy tokens — for the
tiny default models and for every case of the family table (tests/tiny_families.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_mpi

DRIVER = str(Path(__file__).with_name("executor_driver.py"))
pytestmark = pytest.mark.dist


def _ok_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("OK ")]


def test_single_rank_matches_transformers(tiny_models):
    proc = run_mpi(1, [DRIVER, str(tiny_models["llama"])], timeout=300)
    lines = _ok_lines(proc.stdout)
    assert any(line.startswith("OK llama single ") for line in lines), proc.stdout
    assert sum(line.startswith("OK llama switch ") for line in lines) == 10


def test_two_ranks_every_layout_every_family(tiny_models):
    proc = run_mpi(2, [DRIVER, *(str(tiny_models[f]) for f in ("llama", "mistral", "qwen2"))], timeout=420)
    lines = _ok_lines(proc.stdout)
    for family in ("llama", "mistral", "qwen2"):
        for layout in ("tp2", "pp2", "dp2"):
            assert any(line.startswith(f"OK {family} {layout} ") for line in lines), (family, layout, proc.stdout)
        assert sum(line.startswith(f"OK {family} switch ") for line in lines) == 10
    # one node: tp2 is the whole world on one host, so DeepSpeed's shared-memory all-reduce may serve it
    assert "'tp2': True" in proc.stdout


def test_four_ranks_every_layout(tiny_models):
    proc = run_mpi(4, [DRIVER, str(tiny_models["llama"]), str(tiny_models["qwen2"])], timeout=600)
    lines = _ok_lines(proc.stdout)
    for family in ("llama", "qwen2"):
        for layout in ("tp4", "pp4", "tp2pp2", "dp2tp2", "dp2pp2"):
            assert any(line.startswith(f"OK {family} {layout} ") for line in lines), (family, layout, proc.stdout)
        assert sum(line.startswith(f"OK {family} switch ") for line in lines) == 10
    # tp2 groups inside a 4-rank world must not use the world-wide shared-memory kernel
    assert "'tp2pp2': False" in proc.stdout and "'tp4': True" in proc.stdout


def test_sliding_window(tiny_models):
    proc = run_mpi(2, [DRIVER, str(tiny_models["mistral_window"])], timeout=300)
    lines = _ok_lines(proc.stdout)
    for layout in ("tp2", "pp2", "dp2"):
        assert any(line.startswith(f"OK mistral_window {layout} ") for line in lines), (layout, proc.stdout)


def test_two_ranks_posing_as_two_nodes(tiny_models):
    proc = run_mpi(2, [DRIVER, str(tiny_models["llama"])], env={"SEESAW_TEST_RANKS_PER_NODE": "1"}, timeout=300)
    assert "OK topology nodes=2" in proc.stdout
    # across nodes the TP all-reduce must go through the process group, not the shared-memory kernel
    assert re.search(r"'tp2': False", proc.stdout), proc.stdout
    lines = _ok_lines(proc.stdout)
    assert any(line.startswith("OK llama tp2 ") for line in lines)
    assert sum(line.startswith("OK llama switch ") for line in lines) == 10


def _assert_cases(stdout: str, cases, layouts, switches: int = 10) -> None:
    lines = _ok_lines(stdout)
    for case in cases:
        for layout in layouts:
            assert any(line.startswith(f"OK {case} {layout} ") for line in lines), (case, layout, stdout[-3000:])
        assert sum(line.startswith(f"OK {case} switch ") for line in lines) == switches, (case, stdout[-3000:])


def test_every_family_single_rank(family_models):
    proc = run_mpi(1, [DRIVER, *map(str, family_models.values())], timeout=600)
    _assert_cases(proc.stdout, family_models, ("single",))


def test_every_family_two_ranks(family_models):
    """tp2, pp2 (uneven layer split for odd layer counts), dp2, and tp2 <-> pp2 switches: fused projections,
    experts (fused and per-expert checkpoints), norms over all heads, soft-caps, multipliers, per-layer rope."""
    proc = run_mpi(2, [DRIVER, *map(str, family_models.values())], timeout=900)
    _assert_cases(proc.stdout, family_models, ("tp2", "pp2", "dp2"))


def test_families_four_ranks_replicated_kv_heads(family_models):
    """tp4 over 2 KV heads replicates each KV head on two ranks: OLMo-2's k norm, Phi-3's fused k/v blocks
    and Mixtral's experts (intermediate split four ways) under it, plus tp2·pp2, pp4 where the layers allow
    (5-layer cases), and the switches."""
    cases = ("olmo2", "phi3", "mixtral", "gemma3")
    proc = run_mpi(4, [DRIVER, *(str(family_models[c]) for c in cases)], timeout=900)
    _assert_cases(proc.stdout, ("olmo2", "gemma3"), ("tp4", "pp4", "tp2pp2", "dp2tp2", "dp2pp2"))
    _assert_cases(proc.stdout, ("phi3", "mixtral"), ("tp4", "tp2pp2", "dp2tp2", "dp2pp2"))  # 3 layers: no pp4
