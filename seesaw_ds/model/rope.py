"""Rotary embeddings for a packed batch, independent of the batch a sequence runs in.

transformers' rotary modules compute every rope type (default, linear, llama3, yarn, longrope, dynamic);
seesaw_ds calls them. Two types pick their frequencies from the *longest position in the call*
(``longrope``: the long factors past ``original_max_position_embeddings``; ``dynamic``: NTK scaling grown
to the sequence length, kept as module state). Called once on a packed batch they would make a
sequence's output depend on the other sequences in it. :class:`SequenceRope` calls them once per
sequence instead, from the module's original state, which is exactly what transformers computes when it
generates that sequence alone (prefill with the prompt's length, then each decode step with the length so
far). Other rope types depend on the position alone: for them :class:`SequenceRope` computes ``(cos, sin)``
once per position, into a table per layer type (with the module itself, over ``0 .. n-1``), and a step reads
it by position: one indexing operation each for cos and sin instead of the module's matmul, concatenation,
cos, sin, scaling and casts, the same values (the module computes each position independently). The table
grows by doubling when a step reaches past it; the caller says how far a step reaches (``max_position``, known
on the host) so that the lookup needs nothing from the device.

Applying the embedding is the layers' own code: transformers' attention calls its module's
``apply_rotary_pos_emb``. :func:`fuse_rotary_apply` gives the modules whose function is Llama's (to the
character) one that runs the extension's single call on a CPU (:func:`seesaw_ds.model.kernels.rotary`: the same
bits as its twelve operators) and the original everywhere else.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from seesaw_ds.model import kernels
from seesaw_ds.model.modules import source_text


class SequenceRope(nn.Module):
    """``(cos, sin)`` for packed positions; per sequence when the rope type depends on the length."""

    MIN_TABLE = 256
    """Positions of a table when first made."""

    def __init__(self, rotary: nn.Module, per_sequence: bool):
        super().__init__()
        self.rotary = rotary
        self.per_sequence = per_sequence
        # layer type -> ([P, dim] cos, sin, (dtype, device) of the hidden states they were made for)
        self._tables: dict[str | None, tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self.generation = 0
        """Tables made so far: a CUDA graph that read a table is captured again once it changes."""

    def table(self, hidden: torch.Tensor, positions: int, layer_type: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of positions ``0 .. >= positions - 1`` as ``[P, dim]`` tensors, what the module returns
        for ``hidden`` (its dtype: some families' modules keep float32) on ``hidden``'s device; made here, or
        grown by doubling when too short (only for rope types that do not depend on the length)."""
        made_for = (hidden.dtype, hidden.device)
        have = self._tables.get(layer_type)
        if have is not None and have[2] != made_for:
            have = None  # another dtype or device: made anew, at the size needed
        if have is not None and have[0].shape[0] >= positions:
            return have[0], have[1]
        size = max(self.MIN_TABLE, positions, 2 * have[0].shape[0] if have is not None else 0)
        cos, sin = self._call(hidden, torch.arange(size, device=hidden.device)[None, :], layer_type)
        self._tables[layer_type] = cos[0], sin[0], made_for
        self.generation += 1
        return cos[0], sin[0]

    def _reset(self, layer_type: str | None) -> None:
        """Undo a dynamic rope's growth (transformers keeps it as state), as for a freshly loaded model."""
        prefix = f"{layer_type}_" if layer_type else ""
        original = getattr(self.rotary, f"{prefix}original_inv_freq", None)
        if original is None:
            return
        self.rotary.register_buffer(f"{prefix}inv_freq", original.clone(), persistent=False)
        if hasattr(self.rotary, "original_max_seq_len"):
            setattr(self.rotary, f"{prefix}max_seq_len_cached" if layer_type else "max_seq_len_cached",
                    self.rotary.original_max_seq_len)

    def _call(self, hidden, position_ids, layer_type):
        if layer_type is None:
            return self.rotary(hidden, position_ids)
        return self.rotary(hidden, position_ids, layer_type)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, segments: list[int],
                layer_type: str | None = None, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` is ``[1, T]`` (packed prefill, sequences bounded by ``segments``) or ``[N, 1]``
        (decode, one row per sequence); ``max_position`` the largest of them, where the caller knows it (else
        it is read from the tensor: a device sync on an accelerator)."""
        if not self.per_sequence:
            if max_position is None:
                max_position = int(position_ids.max())
            cos, sin = self.table(hidden, max_position + 1, layer_type)
            return cos[position_ids], sin[position_ids]
        pieces = []
        if position_ids.shape[0] == 1 and len(segments) > 1:
            rows = [position_ids[:, lo:hi] for lo, hi in zip(segments[:-1], segments[1:])]
        else:
            rows = list(position_ids.split(1))
        for row in rows:
            self._reset(layer_type)
            pieces.append(self._call(hidden, row, layer_type))
        self._reset(layer_type)
        dim = 1 if position_ids.shape[0] == 1 else 0
        return torch.cat([cos for cos, _ in pieces], dim=dim), torch.cat([sin for _, sin in pieces], dim=dim)


_LLAMA_SOURCES: tuple[str, str] | None = None


def _is_llama_rotary(module) -> bool:
    """Whether ``module``'s ``apply_rotary_pos_emb`` and ``rotate_half`` are transformers' Llama code to the
    character (Mistral's, Qwen2's, Qwen3's, Mixtral's, Granite's ... are copies; others differ and are left)."""
    global _LLAMA_SOURCES
    if _LLAMA_SOURCES is None:
        from transformers.models.llama import modeling_llama as llama

        apply = getattr(llama.apply_rotary_pos_emb, "seesaw_original", llama.apply_rotary_pos_emb)
        _LLAMA_SOURCES = (source_text(apply), source_text(llama.rotate_half))
    apply, rotate_half = getattr(module, "apply_rotary_pos_emb", None), getattr(module, "rotate_half", None)
    return apply is not None and rotate_half is not None and \
        (source_text(apply), source_text(rotate_half)) == _LLAMA_SOURCES


def _fused(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim == 1 and q.device.type == "cpu" and q.dim() == 4 and cos.dim() == 3 \
                and q.dtype == k.dtype == cos.dtype == sin.dtype and not torch.compiler.is_compiling():
            return kernels.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)  # a compiled graph fuses the original itself

    apply_rotary_pos_emb.seesaw_original = original
    return apply_rotary_pos_emb


def fuse_rotary_apply(root: nn.Module) -> int:
    """Give each transformers module that defines a class under ``root`` and whose ``apply_rotary_pos_emb`` is
    Llama's a function that calls :func:`~seesaw_ds.model.kernels.rotary` for CPU tensors of one dtype outside
    ``torch.compile``, and the original otherwise (a module attribute, read by the attention's forward at each
    call: the forward itself, and its decorators, stay transformers'). Idempotent; returns how many modules'
    function is the fused one. Nothing is changed where the extension is not built."""
    if not kernels.built():
        return 0
    count = 0
    for name in sorted({type(module).__module__ for module in root.modules()}):
        module = sys.modules.get(name)
        apply = getattr(module, "apply_rotary_pos_emb", None)
        if apply is None:
            continue
        if not hasattr(apply, "seesaw_original"):
            if not _is_llama_rotary(module):
                continue
            module.apply_rotary_pos_emb = _fused(apply)
        count += 1
    return count
