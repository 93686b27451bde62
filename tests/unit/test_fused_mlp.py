"""transformers' Llama-recipe MLPs with SiLU run their middle, ``silu(gate) * up``, as the kernel's one pass on a
CPU (modules.fuse_gated_mlps, kernels.silu_mul): bf16 and float16 as ATen's two operators round them (a one-step
difference allowed on a sliver of elements), float32 within a few ulps; every Llama-recipe class with SiLU
fused, the others left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesaw_ds.model import kernels
from seesaw_ds.model.modules import fuse_gated_mlps

pytestmark = pytest.mark.skipif(not kernels.built(), reason="the extension cannot be built here")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1536), (3, 7, 64), (2048, 1536), (5, 100)])
def test_the_kernel_gives_atens_values(dtype, shape):
    torch.manual_seed(shape[-1])
    fused = (torch.randn(*shape[:-1], 2 * shape[-1]) * 4).to(dtype)  # gate and up as the fused projection's halves
    gate, up = fused[..., :shape[-1]], fused[..., shape[-1]:]
    want, got = F.silu(gate) * up, kernels.silu_mul(gate, up)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:  # the exponential in another form: a value may round the other way, one step at most
        close = (got.float() - want.float()).abs() <= want.float().abs() * 2 ** -6 + 1e-6
        assert bool(close.all()) and int((got != want).sum()) <= max(1, got.numel() // 1000)


def test_extremes_and_refusals():
    x = torch.tensor([[-1e4, -90.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 90.0, 1e4, float("inf"), float("-inf"),
                       float("nan")] * 2]).bfloat16()
    up = torch.full_like(x, 2.0)
    want, got = F.silu(x) * up, kernels.silu_mul(x, up)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
    with pytest.raises(RuntimeError, match="one dtype and shape"):
        kernels.silu_mul(x, up.float())


def test_it_applies_where_its_lanes_run():
    avx512 = kernels.isa().startswith("avx512")
    assert kernels.silu_mul_applies(torch.zeros(2, 8).bfloat16()) == avx512
    assert not kernels.silu_mul_applies(torch.zeros(2, 8))  # float32: the scalar loop, ATen's is faster
    assert not kernels.silu_mul_applies(torch.zeros(2, 8).half())


def _mlp(model_type: str, dtype: torch.dtype, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def test_a_fused_model_gives_the_same_logits():
    model, fused = _mlp("llama", torch.bfloat16), _mlp("llama", torch.bfloat16)
    assert fuse_gated_mlps(fused) == 2 and type(fused.model.layers[0].mlp).__name__ == "FusedLlamaMLP"
    assert fuse_gated_mlps(fused) == 2  # idempotent
    ids = torch.randint(0, 128, (2, 9))
    with torch.inference_mode():
        want, got = model(ids).logits, fused(ids).logits
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -6


def test_only_llama_recipe_silu_mlps_are_fused():
    def count(model_type: str, **extra) -> int:
        with torch.device("meta"):
            return fuse_gated_mlps(_mlp(model_type, torch.float32, **extra))

    assert count("llama") == 2 and count("mistral") == 2 and count("qwen3", head_dim=16) == 2
    assert count("llama", hidden_act="gelu") == 0  # another activation: transformers' own forward
    assert count("gpt2") == 0  # no gated MLP
