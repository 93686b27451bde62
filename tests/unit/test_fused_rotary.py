"""transformers' Llama ``apply_rotary_pos_emb`` in one extension call (kernels.rotary, rope.fuse_rotary_apply):
ATen's bits in float32, bfloat16 and float16, decode and packed-prefill shapes; the function given only to the
modules whose code is Llama's, once, the original kept for everything the kernel does not take; refusals."""
from __future__ import annotations

import importlib

import pytest
import torch

from seesaw_ds.model import kernels
from seesaw_ds.model.rope import fuse_rotary_apply


def _original(module):
    apply = module.apply_rotary_pos_emb
    return getattr(apply, "seesaw_original", apply)


def _inputs(dtype, batch, q_heads, kv_heads, tokens, dim, seed=0, cos_batch=None):
    """q and k as the attention makes them (views of one projection output, transposed) and a real table."""
    torch.manual_seed(seed)
    projection = torch.randn(batch, tokens, (q_heads + 2 * kv_heads) * dim).to(dtype)
    q = projection[..., :q_heads * dim].view(batch, tokens, q_heads, dim).transpose(1, 2)
    k = projection[..., q_heads * dim:(q_heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    positions = torch.randint(0, 8000, (cos_batch or batch, tokens)).double()
    angles = positions[..., None] * 10000.0 ** (-torch.arange(0, dim, 2).double() / dim)
    angles = torch.cat([angles, angles], -1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 9, 3, 1, 64), (1, 9, 3, 41, 64), (2, 4, 1, 3, 128), (3, 2, 2, 5, 6)])
def test_the_kernel_gives_the_operators_bits(dtype, shape):
    from transformers.models.llama import modeling_llama

    q, k, cos, sin = _inputs(dtype, *shape)
    want_q, want_k = _original(modeling_llama)(q, k, cos, sin)
    got_q, got_k = kernels.rotary(q, k, cos, sin)
    assert got_q.dtype == dtype and torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_cos_sin_broadcast_over_the_batch():
    from transformers.models.llama import modeling_llama

    q, k, cos, sin = _inputs(torch.bfloat16, 3, 4, 2, 6, 32, cos_batch=1)
    want = _original(modeling_llama)(q, k, cos, sin)
    got = kernels.rotary(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_what_it_refuses():
    q, k, cos, sin = _inputs(torch.bfloat16, 1, 2, 1, 3, 8)
    with pytest.raises(RuntimeError, match="of one dtype"):
        kernels.rotary(q, k, cos.float(), sin.float())
    with pytest.raises(RuntimeError, match="head size must be even"):
        kernels.rotary(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(RuntimeError, match="must broadcast"):
        kernels.rotary(q, k, cos[:, :2], sin[:, :2])


def test_only_llama_code_is_given_the_kernel_and_the_original_stays_for_the_rest(family_models, one_torch_thread):
    """A bf16 Llama stage: its module's function is the fused one (once, however often a stage is built);
    OLMo-2's differs from Llama's and is left. The fused function calls the original for inputs the kernel
    does not take (promoting dtypes, another unsqueeze dimension): the same results as transformers'."""
    from unit.test_compiled import _executor

    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    olmo2 = importlib.import_module("transformers.models.olmo2.modeling_olmo2")
    stage = _executor(family_models["llama3"], "bfloat16", False).stages["decode"]
    assert hasattr(llama.apply_rotary_pos_emb, "seesaw_original")
    assert fuse_rotary_apply(stage) == 1  # idempotent: Llama's module only, not wrapped twice
    assert not hasattr(llama.apply_rotary_pos_emb.seesaw_original, "seesaw_original")
    olmo_stage = _executor(family_models["olmo2"], "bfloat16", False).stages["decode"]
    assert fuse_rotary_apply(olmo_stage) == 0 and not hasattr(olmo2.apply_rotary_pos_emb, "seesaw_original")

    fused, original = llama.apply_rotary_pos_emb, llama.apply_rotary_pos_emb.seesaw_original
    q, k, cos, sin = _inputs(torch.bfloat16, 2, 4, 2, 3, 16)
    for args in ((q, k, cos.float(), sin.float()), (q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)):
        got, want = fused(*args), original(*args)
        assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
