"""The reference attention paths: one SDPA (or eager, soft-capped) call per prompt of a packed row.

Used where no one-call backend applies (no compiler; on an accelerator, a batch with prompts over a cached
prefix, windows or soft-caps) and by the tests and the accelerator backend as what the fast paths must equal.
A module of its own so that both ``attention.py`` and ``device_attention.py`` import it (neither imports
the other).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and, with ``window``, sliding-window) mask of queries at ``query_pos`` over keys at ``key_pos``."""
    mask = key_pos[None, :] <= query_pos[:, None]
    if window:
        mask &= key_pos[None, :] > query_pos[:, None] - window
    return mask


def eager(query, key, value, mask: torch.Tensor | None, scaling: float, softcap: float) -> torch.Tensor:
    """transformers' eager attention with logit soft-capping: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


def one_token(query, keys, values, scaling, softcap=None) -> torch.Tensor:
    """One sequence's new token over its gathered KV: query [1, Hq, 1, D], keys/values [Hkv, L, D]; eager
    where soft-capped, else SDPA (GQA without repeating the KV heads)."""
    if softcap:
        return eager(query, keys[None], values[None], None, scaling, softcap)
    return F.scaled_dot_product_attention(query, keys[None], values[None], scale=scaling,
                                          enable_gqa=query.shape[1] != keys.shape[0])


def prefill_reference(query, key, value, bounds: list[int], scaling, window, softcap=None,
                      contexts=None) -> torch.Tensor:
    """One SDPA (or eager, soft-capped) call per prompt: the path without the extension (and, on an
    accelerator, of a batch with prompts over a cached prefix: ``contexts[i]``, that prefix's ``(keys,
    values)``, or None), and the tests' reference."""
    outputs = []
    gqa = query.shape[1] != key.shape[1]
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        context = contexts[index] if contexts is not None else None
        if context is not None:  # rows are positions P.. of the prompt; keys its whole KV
            done = context[0].shape[1]
            k = torch.cat([context[0][None].to(k.dtype), k], dim=2)
            v = torch.cat([context[1][None].to(v.dtype), v], dim=2)
            mask = window_mask(torch.arange(done, done + stop - start, device=query.device),
                               torch.arange(done + stop - start, device=query.device), window)
            out = (eager(q, k, v, mask, scaling, softcap) if softcap else
                   F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
        elif softcap:
            positions = torch.arange(stop - start, device=query.device)
            out = eager(q, k, v, window_mask(positions, positions, window), scaling, softcap)
        elif window and stop - start > window:
            positions = torch.arange(stop - start, device=query.device)
            mask = window_mask(positions, positions, window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        outputs.append(out)
    return torch.cat(outputs, dim=2)
