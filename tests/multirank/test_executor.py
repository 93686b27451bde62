"""Executor on real MPI ranks (gloo, DeepSpeed's CPU accelerator): every static layout of 1, 2 and 4 ranks
and ten layout switches, logits within 1e-4 of plain transformers and identical greedy tokens — for the
tiny default models and for every case of the family table (tests/tiny_families.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_mpi
from seesaw_ds.distributed.env import cpu_affinity

DRIVER = str(Path(__file__).with_name("executor_driver.py"))
pytestmark = pytest.mark.dist
# Every model of one rank count goes through one launch (a module fixture); each test reads its lines.
TINY_2 = ("llama", "mistral", "qwen2", "mistral_window")
TINY_4 = ("llama", "qwen2")
FAMILIES_4 = ("olmo2", "phi3", "mixtral", "gemma3")
FAMILY_LAYOUTS_4 = "tp4,pp4,tp2pp2"


def _ok_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("OK ")]


def _args(tiny_models, family_models, tiny, families) -> list[str]:
    """Driver arguments: the tiny models under their own names, the family cases as ``family-<case>``."""
    return [*(f"{name}={tiny_models[name]}" for name in tiny),
            *(f"family-{case}={family_models[case]}" for case in families)]


@pytest.fixture(scope="module")
def one_rank(tiny_models, family_models):
    return run_mpi(1, [DRIVER, *_args(tiny_models, family_models, ("llama",), family_models)], timeout=900)


@pytest.fixture(scope="module")
def two_ranks(tiny_models, family_models):
    return run_mpi(2, [DRIVER, *_args(tiny_models, family_models, TINY_2, family_models)], timeout=1500)


@pytest.fixture(scope="module")
def four_ranks(tiny_models, family_models):
    """More ranks than a 2-core machine has cores: MPI waits yield there (helpers.run_mpi) and the engine
    turns DeepSpeed's spinning shared-memory all-reduce off, saying so. The family cases run the layouts
    that put their own blocks under 4 ranks (tp4's replicated KV heads, tp2·pp2, pp4); replicas of a
    2-rank layout (dp2·tp2, dp2·pp2) are the tiny models' check here, and every family's dp2 on 2 ranks."""
    return run_mpi(4, [DRIVER, *_args(tiny_models, family_models, TINY_4, ()), f"--layouts={FAMILY_LAYOUTS_4}",
                       *_args(tiny_models, family_models, (), FAMILIES_4)], timeout=1200)


def test_single_rank_matches_transformers(one_rank):
    lines = _ok_lines(one_rank.stdout)
    assert any(line.startswith("OK llama single ") for line in lines), one_rank.stdout
    assert sum(line.startswith("OK llama switch ") for line in lines) == 10


def test_two_ranks_every_layout_every_family(two_ranks):
    lines = _ok_lines(two_ranks.stdout)
    for family in ("llama", "mistral", "qwen2"):
        for layout in ("tp2", "pp2", "dp2"):
            assert any(line.startswith(f"OK {family} {layout} ") for line in lines), (family, layout, two_ranks.stdout)
        assert sum(line.startswith(f"OK {family} switch ") for line in lines) == 10
    # one node: tp2 is the whole world on one host, so DeepSpeed's shared-memory all-reduce may serve it
    assert "'tp2': True" in two_ranks.stdout


def test_four_ranks_every_layout(four_ranks):
    lines = _ok_lines(four_ranks.stdout)
    for family in ("llama", "qwen2"):
        for layout in ("tp4", "pp4", "tp2pp2", "dp2tp2", "dp2pp2"):
            assert any(line.startswith(f"OK {family} {layout} ") for line in lines), (family, layout, four_ranks.stdout)
        assert sum(line.startswith(f"OK {family} switch ") for line in lines) == 10
    # tp2 groups inside a 4-rank world must not use the world-wide shared-memory kernel; tp4 may, where every
    # rank has a CPU of its own (the kernel spins while it waits)
    roomy = len(cpu_affinity()) >= 4
    assert "'tp2pp2': False" in four_ranks.stdout and f"'tp4': {roomy}" in four_ranks.stdout
    if not roomy:
        assert f"4 ranks on a node with {len(cpu_affinity())} CPUs" in four_ranks.stderr, four_ranks.stderr[-2000:]


def test_sliding_window(two_ranks):
    lines = _ok_lines(two_ranks.stdout)
    for layout in ("tp2", "pp2", "dp2"):
        assert any(line.startswith(f"OK mistral_window {layout} ") for line in lines), (layout, two_ranks.stdout)


def test_two_ranks_posing_as_two_nodes(posed_two_nodes):
    """The executor run across posed nodes (tests/multirank/conftest.py; test_host_groups.py checks the
    same run's routes)."""
    assert "OK topology nodes=2" in posed_two_nodes.stdout
    # across nodes the TP all-reduce must go through the process group, not the shared-memory kernel
    assert re.search(r"'tp2': False", posed_two_nodes.stdout), posed_two_nodes.stdout
    lines = _ok_lines(posed_two_nodes.stdout)
    assert any(line.startswith("OK llama tp2 ") for line in lines)
    assert sum(line.startswith("OK llama switch ") for line in lines) == 10


def _assert_cases(stdout: str, cases, layouts, switches: int = 10) -> None:
    lines = _ok_lines(stdout)
    for case in cases:
        for layout in layouts:
            assert any(line.startswith(f"OK family-{case} {layout} ") for line in lines), (case, layout, stdout[-3000:])
        assert sum(line.startswith(f"OK family-{case} switch ") for line in lines) == switches, (case, stdout[-3000:])


def test_every_family_single_rank(one_rank, family_models):
    _assert_cases(one_rank.stdout, family_models, ("single",))


def test_every_family_two_ranks(two_ranks, family_models):
    """tp2, pp2 (uneven layer split for odd layer counts), dp2, and tp2 <-> pp2 switches: fused projections,
    experts (fused and per-expert checkpoints), norms over all heads, soft-caps, multipliers, per-layer rope."""
    _assert_cases(two_ranks.stdout, family_models, ("tp2", "pp2", "dp2"))


def test_families_four_ranks_replicated_kv_heads(four_ranks):
    """tp4 over 2 KV heads replicates each KV head on two ranks: OLMo-2's k norm, Phi-3's fused k/v blocks
    and Mixtral's experts (intermediate split four ways) under it, plus tp2·pp2, pp4 where the layers allow
    (5-layer cases), and the switches."""
    _assert_cases(four_ranks.stdout, ("olmo2", "gemma3"), ("tp4", "pp4", "tp2pp2"))
    _assert_cases(four_ranks.stdout, ("phi3", "mixtral"), ("tp4", "tp2pp2"))  # 3 layers: no pp4
    lines = _ok_lines(four_ranks.stdout)
    assert not any(line.startswith(("OK family-olmo2 dp2", "OK family-phi3 dp2")) for line in lines), "--layouts"
