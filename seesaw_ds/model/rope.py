"""Rotary embeddings for a packed batch, independent of the batch a sequence runs in.

transformers' rotary modules compute every rope type (default, linear, llama3, yarn, longrope, dynamic);
seesaw_ds calls them. Two types pick their frequencies from the *longest position in the call*
(``longrope``: the long factors past ``original_max_position_embeddings``; ``dynamic``: NTK scaling grown
to the sequence length, kept as module state). Called once on a packed batch they would make a
sequence's output depend on the other sequences in it. :class:`SequenceRope` calls them once per
sequence instead, from the module's original state, which is exactly what transformers computes when it
generates that sequence alone (prefill with the prompt's length, then each decode step with the length so
far). Other rope types take one call for the whole batch.
"""
from __future__ import annotations

import torch
from torch import nn


class SequenceRope(nn.Module):
    """``(cos, sin)`` for packed positions; per sequence when the rope type depends on the length."""

    def __init__(self, rotary: nn.Module, per_sequence: bool):
        super().__init__()
        self.rotary = rotary
        self.per_sequence = per_sequence

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
                layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` is ``[1, T]`` (packed prefill, sequences bounded by ``segments``) or ``[N, 1]``
        (decode, one row per sequence)."""
        if not self.per_sequence:
            return self._call(hidden, position_ids, layer_type)
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
