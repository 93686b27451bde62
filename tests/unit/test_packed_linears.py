"""oneDNN-prepacked bf16 linears (backends/deepspeed.pack_cpu_linears) give the same bits as the views they
replace, for AutoTP's column and row linears and a plain nn.Linear, on the real model's decode and prefill
shapes, contiguous or not; so do sibling linears packed as one GEMM (q/k/v, gate/up: SiblingGroup), whatever
order they are called in, alone and in whole eager stages of several families; float32 stages and other
devices are left alone. On a CPU whose oneDNN has no bf16 path (AVX2 only: ``widens_bf16``) the copies are
float32: each output is then the exact product rounded once to bf16 (within float32's summation error), and
the siblings' one GEMM gives each member's own packed bits."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from seesaw_ds.backends import deepspeed as backend

pytestmark = pytest.mark.skipif(not backend.can_pack_cpu_linears(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN")
WIDENS = backend.widens_bf16()
"""This CPU's oneDNN has no bf16 path: the packed copies are float32, and the views' emulated bf16 GEMM sums
in another order, so the packed results are checked against the exact product instead of the views' bits."""


def _rounded_once(got: torch.Tensor, layer: nn.Module, x: torch.Tensor) -> bool:
    """``got`` is ``x @ layer.weight.T`` computed in float32 and rounded once to bf16 (then the bias added in
    bf16, a second rounding: the bound is relative to the product and the bias, not to their sum)."""
    weight = layer.weight.double()
    exact = x.double() @ weight.T
    bound = exact.abs() * 2.0 ** -8 + (x.double().abs() @ weight.abs().T) * 2.0 ** -16
    if layer.bias is not None:
        exact = exact + layer.bias.double()
        bound = bound + (exact.abs() + bound) * 2.0 ** -8
    return bool(((got.double() - exact).abs() <= bound).all())


def _layers(dtype):
    torch.manual_seed(0)
    column = backend.column_linear((960, 576), torch.randn(960, 576).to(dtype), None, None, "qkv")
    biased = backend.column_linear((192, 576), torch.randn(192, 576).to(dtype), torch.randn(192).to(dtype), None,
                                   "k_proj")
    host = torch.randn(576, 3072).to(dtype)  # a row shard is a view into a wider host tensor
    row = backend.row_linear((576, 1536), host[:, :1536], None, None, "down_proj")
    head = nn.Linear(576, 4099, bias=False).to(dtype)
    return nn.ModuleDict(dict(column=column, biased=biased, row=row, head=head))


@pytest.mark.parametrize("shape", [(1, 37, 576), (64, 1, 576), (3, 576), (1, 1, 576), "strided"])
def test_packed_linears_are_bit_identical(shape):
    layers = _layers(torch.bfloat16)
    if shape == "strided":  # a slice of a wider row, as a fused projection's output is
        x, x_row = torch.randn(5, 900).bfloat16()[:, 100:676], torch.randn(5, 2000).bfloat16()[:, 7:1543]
    else:
        x = torch.randn(*shape).bfloat16()
        x_row = torch.randn(*shape[:-1], 1536).bfloat16()
    want = {name: layer(x_row if name == "row" else x) for name, layer in layers.items()}
    views = {name: layer.weight.data_ptr() for name, layer in layers.items()}
    packed_bytes = backend.pack_cpu_linears(layers)
    assert packed_bytes == sum(layer.weight.numel() * (4 if WIDENS else 2) for layer in layers.values())
    for name, layer in layers.items():
        assert type(layer).__name__.startswith("Packed"), name
        assert layer.weight.data_ptr() == views[name]  # the view of the host copy stays
        got = layer(x_row if name == "row" else x)
        assert got.shape == want[name].shape, name
        if WIDENS:  # float32 copies: the product rounded once
            assert layer.seesaw_packed.dtype == torch.float32, name
            assert _rounded_once(got, layer, x_row if name == "row" else x), name
        else:
            assert torch.equal(got, want[name]), name


def test_only_bf16_on_cpu_is_packed():
    assert not backend.can_pack_cpu_linears(torch.device("cpu"), torch.float32)
    assert not backend.can_pack_cpu_linears(torch.device("cuda"), torch.bfloat16)
    layers = _layers(torch.float32)
    assert backend.pack_cpu_linears(layers) == 0
    assert not any(type(layer).__name__.startswith("Packed") for layer in layers.values())


class _Siblings(nn.Module):
    """An attention's q/k/v (k and v with biases, as Qwen2's) and an MLP's gate/up, AutoTP column linears."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(1)
        self.q_proj = backend.column_linear((576, 576), torch.randn(576, 576).to(dtype), None, None, "q_proj")
        self.k_proj = backend.column_linear((192, 576), torch.randn(192, 576).to(dtype), torch.randn(192).to(dtype),
                                            None, "k_proj")
        self.v_proj = backend.column_linear((192, 576), torch.randn(192, 576).to(dtype), torch.randn(192).to(dtype),
                                            None, "v_proj")
        self.gate_proj = backend.column_linear((1536, 576), torch.randn(1536, 576).to(dtype), None, None, "gate")
        self.up_proj = backend.column_linear((1536, 576), torch.randn(1536, 576).to(dtype), None, None, "up")

    NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@pytest.mark.parametrize("order", [_Siblings.NAMES, tuple(reversed(_Siblings.NAMES)),
                                   ("q_proj", "q_proj", "k_proj", "v_proj", "k_proj", "gate_proj", "up_proj")])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 33, 576), (7, 576)])
def test_sibling_linears_packed_as_one_gemm_give_each_ones_bits(order, shape):
    module = _Siblings(torch.bfloat16)
    x = torch.randn(*shape).bfloat16()
    alone = _Siblings(torch.bfloat16)  # float32 copies: each member packed alone gives the bits to match
    if WIDENS:
        backend.pack_cpu_linears(alone)
    want = {name: getattr(alone, name)(x) for name in _Siblings.NAMES}
    weight_bytes = sum(getattr(module, name).weight.numel() * (4 if WIDENS else 2) for name in _Siblings.NAMES)
    assert backend.pack_cpu_linears(module, fuse_siblings=True) == weight_bytes
    attention, mlp = module.q_proj.seesaw_group, module.gate_proj.seesaw_group
    assert attention is not None and attention is module.k_proj.seesaw_group is module.v_proj.seesaw_group
    assert mlp is not None and mlp is module.up_proj.seesaw_group and mlp is not attention
    assert attention.sizes == [576, 192, 192] and mlp.sizes == [1536, 1536]
    for name in order:
        got = getattr(module, name)(x)
        assert got.shape == want[name].shape and torch.equal(got, want[name]), name
    other = torch.randn(*shape).bfloat16()  # a member called with another input computes for that input
    assert torch.equal(module.k_proj(other), alone.k_proj(other))
    for name in _Siblings.NAMES:  # every member served once more: the groups keep no activation alive
        getattr(module, name)(x)
    assert attention._input is None and mlp._input is None


def test_siblings_stay_apart_without_fuse():
    module = _Siblings(torch.bfloat16)
    backend.pack_cpu_linears(module)
    assert all(getattr(module, name).seesaw_group is None for name in _Siblings.NAMES)


@pytest.mark.parametrize("case", ["llama3", "qwen2", "qwen3", "olmo2", "qwen2_moe", "gemma2", "phi3"])
def test_an_eager_bf16_stage_with_fused_siblings_gives_the_views_logits(family_models, one_torch_thread, case):
    """A one-rank executor in bf16 (packed, q/k/v and gate/up fused: what an eager CPU job runs) against the
    same model over the plain weight views: bit-identical logits over a packed prefill and decode steps.
    Phi-3's projections are fused in its checkpoint already: nothing is grouped there."""
    from unit.test_compiled import _executor, _generate

    fused = _executor(family_models[case], "bfloat16", False)
    groups = {id(module.seesaw_group) for module in fused.stages["decode"].modules()
              if getattr(module, "seesaw_group", None) is not None}
    # q/k/v and gate/up in every layer (Qwen2-MoE: its shared expert's gate/up; the routed experts are sharded
    # modules of their own)
    assert len(groups) == (0 if case == "phi3" else 2 * len(fused.stages["decode"].layers))
    views = _executor(family_models[case], "bfloat16", False, prepack=False)
    for got, want in zip(_generate(fused), _generate(views)):
        assert torch.equal(got, want)


def test_the_views_linear_compiles_whole():
    """``model.cpu_prepack=false`` under ``torch.compile``: the views' linear (widened where oneDNN has no bf16
    path) is traced without a graph break, and its result is the eager one within a bf16 rounding."""
    layer = _layers(torch.bfloat16)["column"]
    backend.pack_cpu_linears(layer, prepack=False)
    x = torch.randn(5, 576).bfloat16()
    want = layer(x)
    got = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -7 + 1e-3).all()
