"""transformers' Llama-recipe RMS norms run as the kernel's one pass a row on a CPU (modules.fuse_rms_norms,
kernels.rms_norm): the same values as transformers' own forward (float32 to rounding, bf16 to one rounding
step at most, on a sliver of elements), every Llama-recipe class fused and the others left alone."""
from __future__ import annotations

import pytest
import torch

from seesaw_ds.model import kernels
from seesaw_ds.model.modules import fuse_rms_norms

pytestmark = pytest.mark.skipif(not kernels.built(), reason="the extension cannot be built here")


def _norm(module_path: str, class_name: str, size: int, dtype: torch.dtype, seed: int = 0):
    import importlib

    cls = getattr(importlib.import_module(module_path), class_name)
    generator = torch.Generator().manual_seed(seed)
    norm = cls(size, eps=1e-5)
    norm.weight.data = (torch.randn(size, generator=generator) * 0.5 + 1).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 64), (2048, 576), (5, 100)])
def test_the_kernel_gives_transformers_values(dtype, shape):
    reference = _norm("transformers.models.llama.modeling_llama", "LlamaRMSNorm", shape[-1], dtype)
    fused = _norm("transformers.models.llama.modeling_llama", "LlamaRMSNorm", shape[-1], dtype)
    assert fuse_rms_norms(fused) == 1 and type(fused).__name__ == "FusedLlamaRMSNorm"
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    with torch.inference_mode():
        expected, got = reference(x), fused(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:  # the sum of squares in another order: a bf16 value may round the other way, one step at most
        close = (got.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7 + 1e-6
        assert bool(close.all()) and int((got != expected).sum()) <= max(1, got.numel() // 1000)


def test_a_non_contiguous_input_and_a_weight_of_another_dtype():
    fused = _norm("transformers.models.llama.modeling_llama", "LlamaRMSNorm", 64, torch.bfloat16)
    reference = _norm("transformers.models.llama.modeling_llama", "LlamaRMSNorm", 64, torch.bfloat16)
    fuse_rms_norms(fused)
    x = torch.randn(64, 10).to(torch.bfloat16).t()  # rows of 64 with a stride of 1 across rows
    assert torch.equal(fused(x), reference(x))
    x32 = torch.randn(4, 64)  # float32 input, bf16 weight: transformers' own code (type promotion)
    assert torch.equal(fused(x32), reference(x32)) and fused(x32).dtype == torch.float32


def test_only_llama_recipe_norms_are_fused():
    from transformers import AutoConfig, AutoModelForCausalLM

    def count(model_type: str, **extra) -> tuple[int, int]:
        config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
        return fuse_rms_norms(model), norms

    assert count("llama") == (5, 5)              # 2 a layer and the final norm
    assert count("qwen3", head_dim=16) == (9, 9)  # and the per-head q/k norms
    assert count("mistral") == (5, 5)
    assert count("gemma")[0] == 0 and count("olmo2")[0] == 0  # (1 + weight); the weight before the cast
