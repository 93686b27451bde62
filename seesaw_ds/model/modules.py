"""The few modules seesaw_ds puts in place of transformers' ones when a rank holds only a shard.

Each replaces a module whose own code assumes the whole tensor, and does what that module does on the
shard, holding views of the node-shared host copy (no weight bytes copied):

- :class:`ScaledEmbedding`: the embedding lookup times the family's scale (Gemma's ``embed_scale``
  buffer, which the meta-device template cannot hold; Granite's ``embedding_multiplier``).
- :class:`SplitColumnLinear`: a fused column-parallel linear (Phi-3's ``qkv_proj``, ``gate_up_proj``)
  whose rank shard is one piece per block: one AutoTP ``LinearLayer`` per block, outputs concatenated, so
  the family's slicing of the fused output sees ``[q | k | v]`` of its own heads.
- :class:`ShardedExperts`: transformers-5 fused experts with the intermediate dimension split over TP
  (the same routing loop as transformers' eager experts), output all-reduced.
- :class:`ShardedRMSNorm`: an RMS norm over features split over TP (OLMo-2's q/k norms span all heads):
  the sum of squares is all-reduced, then each rank normalises its own features.
- :func:`fuse_rms_norms`: not a shard's stand-in, a faster forward for the norms whose code is transformers'
  Llama recipe (found by their source), on a CPU: the kernel's one pass a row (``kernels.rms_norm``).
- :class:`VocabParallelHead`: ``lm_head`` split by vocabulary rows over TP; the logits are gathered on the
  TP group's first rank, the one that samples (the others would only have thrown whole logits away).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from seesaw_ds.backends import deepspeed as backend


class ScaledEmbedding(nn.Module):
    """``embedding(ids) * scale``; ``scale`` a Python float or None. A float, not a 0-d tensor: a tensor on the
    host would be copied to the device at every call, a blocking copy that no CUDA graph can capture."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(token_ids, self.weight)
        return hidden if self.scale is None else hidden * self.scale


class SplitColumnLinear(nn.Module):
    """A fused column-parallel linear held as one column-parallel linear per block."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(hidden) for part in self.parts], dim=-1)


class ShardedExperts(nn.Module):
    """MoE experts over this rank's slice of the intermediate dimension.

    ``gate``/``up``: ``[experts, local intermediate, hidden]``; ``down_t``: ``[experts, local intermediate,
    hidden]`` (the host copy stores down projections transposed). Called as transformers' experts module:
    ``(hidden [tokens, hidden], top_k_index, top_k_weights)``.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor, act_fn, group):
        super().__init__()
        self.gate = nn.Parameter(gate, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.down_t = nn.Parameter(down_t, requires_grad=False)
        self.act_fn = act_fn
        self.group = group
        self.num_experts = gate.shape[0]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            state = hidden[token_idx]
            inner = self.act_fn(F.linear(state, self.gate[expert])) * F.linear(state, self.up[expert])
            result = torch.matmul(inner, self.down_t[expert])
            result = result * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, result.to(out.dtype))
        if self.group is not None:
            backend.all_reduce(out, self.group)
        return out


class ShardedRMSNorm(nn.Module):
    """RMS norm (transformers' float32 recipe) over features split across the ``tp`` ranks of ``group``.

    The mean square is the all-reduced sum over ``local features * tp``: exact also when a KV head is
    replicated on several ranks (each copy then counts once per rank holding it, as in the denominator).
    """

    def __init__(self, weight: torch.Tensor, eps: float, group, tp: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.group = group
        self.tp = tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        sum_sq = hidden.pow(2).sum(-1, keepdim=True)
        backend.all_reduce(sum_sq, self.group)
        variance = sum_sq / (hidden.shape[-1] * self.tp)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden).to(dtype)


class VocabParallelHead(nn.Module):
    """``lm_head`` over this TP rank's rows of the vocabulary (``linear``: an AutoTP linear over a view of
    rows ``[tp_index * chunk, ...)``, at most ``chunk`` of them). Every rank multiplies its rows; the group's
    first rank (``ranks[0]``, which samples) gathers the pieces and returns the logits over the whole
    ``vocab``; the others return their own piece, which nobody reads."""

    def __init__(self, linear: nn.Module, vocab: int, chunk: int, group, ranks: tuple[int, ...]):
        super().__init__()
        self.linear = linear
        self.vocab = vocab
        self.chunk = chunk
        self.group = group
        self.ranks = tuple(ranks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.linear(hidden)
        if local.shape[-1] < self.chunk:  # the last rank's rows when the vocabulary does not split evenly
            local = F.pad(local, (0, self.chunk - local.shape[-1]))
        parts = backend.gather_to_first(local.contiguous(), self.group, self.ranks)
        if parts is None:
            return local
        return torch.cat(parts, dim=-1)[..., :self.vocab]


_LLAMA_SOURCES: dict[str, str | None] = {}
_FUSED: dict[tuple[type, str], type | None] = {}


def source_text(function) -> str | None:
    """``function``'s source, dedented (None where it has none to read): how the fusions here and in rope.py
    recognise transformers' Llama code in other families' copies."""
    import inspect
    import textwrap

    try:
        return textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None


def _is_llama_forward(cls: type, llama_name: str) -> bool:
    """Whether ``cls.forward`` is that of transformers' Llama class ``llama_name``, to the character (Mistral's,
    Qwen2's, Qwen3's, Mixtral's, Granite's, Phi-3's ... copy Llama's norm and MLP; others differ and are left)."""
    if llama_name not in _LLAMA_SOURCES:
        from transformers.models.llama import modeling_llama

        _LLAMA_SOURCES[llama_name] = source_text(getattr(modeling_llama, llama_name).forward)
    return _LLAMA_SOURCES[llama_name] is not None and source_text(cls.forward) == _LLAMA_SOURCES[llama_name]


def _fused_norm_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    from seesaw_ds.model import kernels

    if (hidden.device.type == "cpu" and hidden.dtype == self.weight.dtype and not torch.compiler.is_compiling()
            and kernels.built()):
        return kernels.rms_norm(hidden, self.weight, self.variance_epsilon)
    return super(type(self), self).forward(hidden)  # transformers' own code (a compiled graph fuses it itself)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from seesaw_ds.model import kernels

    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype == up.dtype and not torch.compiler.is_compiling() and kernels.silu_mul_applies(gate):
        return self.down_proj(kernels.silu_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)  # transformers' expression (a compiled graph fuses it itself)


def _is_silu(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)


_KINDS = {
    "norm": ("LlamaRMSNorm", lambda module: type(module).__name__.endswith("RMSNorm")
             and hasattr(module, "variance_epsilon"), _fused_norm_forward),
    "mlp": ("LlamaMLP", lambda module: all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(module), _fused_mlp_forward),
}
"""What :func:`_fuse` replaces: kind -> (the Llama class whose forward a class must have, what else a module
must be, the forward that replaces it)."""


def _fuse(root: nn.Module, kind: str) -> int:
    """Give every module under ``root`` of ``kind`` (:data:`_KINDS`) the kernel's forward: a subclass of its
    class, so that isinstance and its attributes stay. Returns how many modules have it."""
    llama_name, applies, forward = _KINDS[kind]
    count = 0
    for module in root.modules():
        if not applies(module):  # the module's own attributes (e.g. its activation): asked of each
            continue
        cls = type(module)
        if (cls, kind) not in _FUSED:  # the class's code: asked once
            fused = None
            if _is_llama_forward(cls, llama_name):
                fused = type(f"Fused{cls.__name__}", (cls,), {"forward": forward})
                _FUSED[(fused, kind)] = fused  # already fused
            _FUSED[(cls, kind)] = fused
        if _FUSED[(cls, kind)] is not None:
            module.__class__ = _FUSED[(cls, kind)]
            count += 1
    return count


def fuse_rms_norms(root: nn.Module) -> int:
    """Give every module under ``root`` whose class is a Llama-recipe RMS norm the kernel's one pass a row
    (:func:`seesaw_ds.model.kernels.rms_norm`); returns how many. Elsewhere than on a CPU in the weights'
    dtype, and while compiling, the forward is the class's own."""
    return _fuse(root, "norm")


def fuse_gated_mlps(root: nn.Module) -> int:
    """Give every module under ``root`` whose class is a Llama-recipe MLP with SiLU the kernel's
    ``silu(gate) * up`` in one pass (:func:`seesaw_ds.model.kernels.silu_mul`) where it is the faster
    (:func:`~seesaw_ds.model.kernels.silu_mul_applies`: bf16 on an AVX-512 CPU); returns how many. Elsewhere,
    and while compiling, the middle is transformers' expression."""
    return _fuse(root, "mlp")
