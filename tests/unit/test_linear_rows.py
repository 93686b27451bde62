"""The few-row bf16 linear (csrc/linear_rows.cpp) and its use by the CPU stage's linears: float32 sums of bf16
products rounded once to bf16, for one to four rows, several weights side by side (strided shard views
included), in both of its loops; refused outside what it does; taken by the packed linears only at one or two
rows of a row-major weight, packed or not (``model.cpu_prepack=false``), with oneDNN or the views' bits
everywhere else."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.model import kernels


LOOPS = [True] + ([False] if kernels.load() is not None and kernels.load().linear_rows_loop() == "avx512_bf16"
                  else [])
"""``portable`` values to run: the portable loop, and the bf16 dot-product loop where this build has it."""


def _reference(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product in float64, and the sum of |x| |w| that bounds a float32 sum's error."""
    whole = torch.cat([w.double() for w in weights])
    rows = x.double().reshape(-1, x.shape[-1])
    return rows @ whole.T, rows.abs() @ whole.abs().T


@pytest.mark.parametrize("portable", LOOPS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [576, 37, 1543])
def test_values_are_float32_sums_rounded_once(portable, rows, k):
    torch.manual_seed(rows * 1000 + k)
    wide = torch.randn(300, k + 11).bfloat16()
    weights = [torch.randn(130, k).bfloat16(), wide[:, 5:5 + k], torch.randn(1, k).bfloat16()]  # one a strided view
    x = torch.randn(rows, k).bfloat16()
    got = kernels.linear_rows(x, weights, portable)
    exact, magnitude = _reference(x, weights)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 431)
    # one rounding to bf16 (half a step: 2^-9 relative) after a float32 sum (2^-24 per term, K terms at most)
    bound = exact.abs() * 2.0 ** -8 + magnitude * k * 2.0 ** -24
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.skipif(len(LOOPS) < 2, reason="this build has only the portable loop")
def test_the_two_loops_agree():
    torch.manual_seed(3)
    x, weights = torch.randn(2, 1, 576).bfloat16(), [torch.randn(960, 576).bfloat16()]
    fast, portable = kernels.linear_rows(x, weights), kernels.linear_rows(x, weights, True)
    assert fast.shape == (2, 1, 960)  # leading dimensions kept
    assert (fast.float() - portable.float()).abs().max() <= fast.float().abs().max() * 2.0 ** -7


def test_what_it_refuses():
    weight = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="1 to 4 input rows, got 5"):
        kernels.linear_rows(torch.randn(5, 16).bfloat16(), [weight])
    with pytest.raises(RuntimeError, match="bfloat16 CPU input"):
        kernels.linear_rows(torch.randn(1, 16), [weight])
    with pytest.raises(RuntimeError, match="with contiguous rows"):
        kernels.linear_rows(torch.randn(1, 16).bfloat16(), [torch.randn(16, 8).bfloat16().t()])
    with pytest.raises(RuntimeError, match=r"\[N, 16\]"):
        kernels.linear_rows(torch.randn(1, 16).bfloat16(), [torch.randn(8, 17).bfloat16()])


def test_the_stage_gets_it_with_the_bf16_dot_build_and_at_one_row_with_the_avx2_build():
    few_rows = kernels.few_row_linear()
    assert (few_rows is not None) == (kernels.isa() in ("avx512bf16", "avx2"))
    if few_rows is not None:
        assert few_rows[1] == (kernels.LINEAR_ROWS if kernels.isa() == "avx512bf16" else kernels.LINEAR_ROWS_AVX2)


class _Spy:
    """A few-row kernel that counts its calls and runs the real one."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, weights):
        self.calls.append(x.numel() // x.shape[-1])
        return kernels.linear_rows(x, weights)


class _Layer(nn.Module):
    """q/k/v, a row-parallel o_proj (its shard lies transposed) and gate/up, as the stage builds them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        column = backend.column_linear
        self.q_proj = column((576, 576), torch.randn(576, 576).bfloat16(), None, None, "q_proj")
        self.k_proj = column((192, 576), torch.randn(192, 576).bfloat16(), torch.randn(192).bfloat16(), None, "k")
        self.v_proj = column((192, 576), torch.randn(192, 576).bfloat16(), None, None, "v_proj")
        self.o_proj = backend.row_linear((576, 576), torch.randn(576, 576).bfloat16().t(), None, None, "o_proj")
        self.gate_proj = column((1536, 576), torch.randn(1536, 576).bfloat16(), None, None, "gate_proj")
        self.up_proj = column((1536, 576), torch.randn(1536, 576).bfloat16(), None, None, "up_proj")

    NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


@pytest.mark.skipif(not backend.can_pack_cpu_linears(torch.device("cpu"), torch.bfloat16) or backend.widens_bf16(),
                    reason="no oneDNN bf16 path on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 64])
def test_the_linears_take_it_at_one_or_two_rows_only(prepack, rows):
    layer, views = _Layer(), _Layer()
    spy = _Spy()
    packed_bytes = backend.pack_cpu_linears(layer, fuse_siblings=True, prepack=prepack, few_rows=(spy, 2))
    assert packed_bytes == (sum(getattr(layer, n).weight.numel() * 2 for n in _Layer.NAMES) if prepack else 0)
    assert (layer.q_proj.seesaw_group is not None) == prepack  # siblings share one packed copy only
    x = torch.randn(rows, 576).bfloat16()
    for name in _Layer.NAMES:
        got, want = getattr(layer, name)(x), getattr(views, name)(x)
        assert got.shape == want.shape, name
        if rows > 2 or name == "o_proj":  # oneDNN (packed or the views): the views' bits
            assert torch.equal(got, want), name
        else:  # the few-row kernel: its product rounded to bf16, then the bias added in bf16 as before
            exact, magnitude = _reference(x, [getattr(views, name).weight])
            bias = getattr(views, name).bias
            exact = exact + (bias.double() if bias is not None else 0)
            assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + magnitude * 2.0 ** -8).all(), name
    # q/k/v and gate/up: one call each where grouped, one a member otherwise; o_proj (transposed) never
    assert spy.calls == ([] if rows > 2 else [rows] * (2 if prepack else 5))
    empty = layer.q_proj(torch.randn(0, 576).bfloat16())  # no rows: oneDNN (the kernel takes 1 to 4)
    assert empty.shape == (0, 576) and spy.calls == ([] if rows > 2 else [rows] * (2 if prepack else 5))
