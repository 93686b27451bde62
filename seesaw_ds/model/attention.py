"""Ragged, paged attention plugged into transformers' ``AttentionInterface``.

The transformers decoder layers run unchanged; their attention call lands in :func:`seesaw_attention`,
which reads the per-batch metadata passed down as the ``seesaw`` keyword:

- **prefill**: many sequences of different lengths packed into one row of ``T`` tokens (no padding);
  causal attention within each sequence over its in-batch keys, and the new K/V handed to a *sink* (the
  host staging area, or the device tier) in head-major order;
- **decode**: one new token per sequence, batched as ``[N, heads, 1, head_dim]``; its K/V are written into
  the paged device-tier cache and attention reads each sequence's blocks.

Each path is one call per layer into a backend: on a CPU, ``kernels.py`` (the decode kernel over block
runs, and the packed prefill loop in C++); on an accelerator, ``device_attention.py`` (variable-length
flash attention for the packed prefill). Where the CPU kernel does not apply (decode on an accelerator, or
no compiler), decode gathers every sequence's KV into one padded batch once per layer and computes grouped
scores with two batched matmuls (:func:`_decode_padded`: twice the KV traffic of a paged kernel, but no
per-sequence launches and no per-shape set-up); the per-sequence SDPA path is kept as the tests'
reference. Attention logit soft-capping (Gemma 2) is ``cap * tanh(scores / cap)`` before the mask and
float32 softmax, as transformers' eager attention. Any other keyword argument a family's attention module
passes, and that this function does not implement, is refused rather than ignored.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from seesaw_ds.model import device_attention, kernels
from seesaw_ds.model.attention_reference import eager as _eager
from seesaw_ds.model.attention_reference import prefill_reference as _prefill_reference

ATTENTION_NAME = "seesaw"


class PrefillSink(Protocol):
    """Where prefill K/V go: called once per layer with ``[kv_heads, T, head_dim]`` tensors."""

    def __call__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None: ...


@dataclass
class PrefillMeta:
    """Packed prefill batch: sequence boundaries in the packed row, the KV sink and, for prompts that
    reuse a cached prefix, that prefix's K/V per layer (``contexts[i](layer) -> (keys, values)``, each
    ``[kv_heads, P, head_dim]``; the prompt's rows are then its tokens from position P on)."""

    cu_seqlens: list[int]
    sink: PrefillSink
    bounds: torch.Tensor | None = None  # cu_seqlens as an int64 CPU tensor, made once for every layer
    contexts: list[Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None] | None = None
    device_cache: dict = field(default_factory=dict)  # what an accelerator backend keeps across layers

    def __post_init__(self) -> None:
        if self.bounds is None:
            self.bounds = torch.tensor(self.cu_seqlens, dtype=torch.long)


@dataclass
class DecodeMeta:
    """Decode batch over the paged cache: per sequence its blocks, length after this token, write slot."""

    cache: "object"                 # seesaw_ds.kv.device.DeviceKVCache
    spans: list[list[tuple[int, int]]]  # per sequence: its KV (new token included) as runs of token slots
    write_blocks: torch.Tensor      # [N] long
    write_offsets: torch.Tensor     # [N] long
    ready: Callable[[int], None] | None = None  # blocks until a layer's swapped-in KV has landed
    runs: kernels.SpanRuns | None = None  # the spans flattened for the kernel (None: the reference path)
    _padded: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def over(cls, cache, spans: list[list[tuple[int, int]]], **fields) -> "DecodeMeta":
        """The metadata for ``spans``, with the kernel's flattened runs (made once per step)."""
        return cls(cache=cache, spans=spans, runs=kernels.SpanRuns(spans), **fields)

    def padded(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's cache slots as one padded ``[N, L]`` index (padding: slot 0) and the ``[N, L]``
        mask of real tokens; made on the first layer (a fixed number of tensor operations, whatever the
        batch), reused by the others."""
        if self._padded is None:
            runs = self.runs if self.runs is not None else kernels.SpanRuns(self.spans)
            runs_per_seq = runs.offsets.diff()
            lengths = torch.zeros(len(runs_per_seq), dtype=torch.long).index_add_(
                0, torch.repeat_interleave(torch.arange(len(runs_per_seq)), runs_per_seq), runs.count)
            total = int(runs.count.sum())
            run_of_token = torch.repeat_interleave(torch.arange(len(runs.count)), runs.count)
            run_start = runs.count.cumsum(0) - runs.count          # each run's first token in the flat order
            seq_start = lengths.cumsum(0) - lengths                # each sequence's first token likewise
            seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            token = torch.arange(total)
            slots = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
            within_run = token - run_start[run_of_token]
            slots[seq_of_token, token - seq_start[seq_of_token]] = runs.first[run_of_token] + within_run
            valid = torch.arange(slots.shape[1])[None, :] < lengths[:, None]
            self._padded = slots.to(device), valid.to(device)
        return self._padded


def _prefill(layer: int, query, key, value, meta: PrefillMeta, scaling, window, softcap=None,
             borrowed: bool = False) -> torch.Tensor:
    # query [1, Hq, T, D]; key/value [1, Hkv, T, D]. ``borrowed``: key/value are a compiled graph's buffers,
    # which it may reuse for later results once this call returns, while the sink may still be copying them
    # on its thread (the staging area's asynchronous writes): the sink gets copies of its own.
    if borrowed:
        meta.sink(layer, key[0].clone(), value[0].clone())
    else:
        meta.sink(layer, key[0], value[0])
    contexts = None
    if meta.contexts is not None:
        contexts = [read(layer) if read is not None else None for read in meta.contexts]
    if query.device.type != "cpu":
        out = device_attention.prefill(query[0], key[0], value[0], meta.cu_seqlens, scaling, window, softcap,
                                       meta.device_cache) if contexts is None else None
        if out is not None:
            return out[None]
    elif kernels.built():
        return kernels.prefill_attention(query[0], key[0], value[0], meta.bounds, scaling, window, softcap,
                                         contexts)[None]
    return _prefill_reference(query, key, value, meta.cu_seqlens, scaling, window, softcap, contexts)


def _decode(layer: int, query, key, value, meta: DecodeMeta, scaling, window, softcap=None) -> torch.Tensor:
    # query [N, Hq, 1, D]; key/value [N, Hkv, 1, D]
    cache = meta.cache
    if meta.ready is not None:
        meta.ready(layer)
    cache.write_tokens(layer, meta.write_blocks, meta.write_offsets, key[:, :, 0], value[:, :, 0])
    flat_keys, flat_values = cache.flat(layer)
    if meta.runs is not None and kernels.applies(flat_keys):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = kernels.decode_attention(query[:, :, 0], flat_keys, flat_values, meta.runs, scale, window, softcap)
        return out[:, :, None]
    if meta.runs is not None:
        return _decode_padded(query, meta, flat_keys, flat_values, scaling, window, softcap)
    return _decode_reference(layer, query, meta, flat_keys, flat_values, scaling, window, softcap)


def _decode_padded(query, meta: DecodeMeta, flat_keys, flat_values, scaling, window, softcap=None):
    """Every sequence's KV gathered into a padded batch, then grouped attention (:func:`_grouped`): query
    [N, Hq, 1, D], the cache views [slots, Hkv, D]. Only the last ``window`` tokens of a sequence are kept
    when set."""
    slots, valid = meta.padded(query.device)
    keys = flat_keys[slots].transpose(1, 2)      # [N, Hkv, L, D]
    values = flat_values[slots].transpose(1, 2)
    if window:
        lengths = valid.sum(dim=1, keepdim=True)
        valid = valid & (torch.arange(valid.shape[1], device=valid.device)[None, :] >= lengths - window)
    return _grouped(query, keys.to(query.dtype), values.to(query.dtype), valid, scaling, softcap)


def _grouped(query, keys, values, valid, scaling, softcap=None) -> torch.Tensor:
    """transformers' eager attention for one query token per sequence, with the query heads of each KV head
    taken together instead of repeating the KV heads: query [N, Hq, 1, D], keys/values [N, Hkv, L, D],
    ``valid`` [N, L] (True: attend). Two batched matmuls and a float32 softmax, the same kernels for every
    length (no per-shape set-up on an accelerator)."""
    n, n_q, _, dim = query.shape
    n_kv = keys.shape[1]
    grouped = query.reshape(n, n_kv, n_q // n_kv, dim)             # query head h reads KV head h // group
    scores = torch.matmul(grouped, keys.transpose(2, 3)) * scaling  # [N, Hkv, group, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values).reshape(n, n_q, 1, dim)


def _decode_reference(layer: int, query, meta: DecodeMeta, flat_keys, flat_values, scaling, window, softcap=None):
    """One SDPA (or eager, soft-capped) call per sequence over its gathered spans: the path where the kernel
    does not apply, and the tests' reference."""
    gqa = query.shape[1] != flat_keys.shape[1]
    outputs = []
    for one_query, spans in zip(query.split(1), meta.spans):
        keys, values = meta.cache.sequence_kv(layer, spans, flat_keys, flat_values)  # one span: a view
        if window and keys.shape[1] > window:
            keys, values = keys[:, -window:], values[:, -window:]
        if softcap:
            outputs.append(_eager(one_query, keys[None], values[None], None, scaling, softcap))
            continue
        outputs.append(F.scaled_dot_product_attention(one_query, keys[None], values[None], scale=scaling,
                                                      enable_gqa=gqa))
    return torch.cat(outputs)


def _attend(layer: int, query, key, value, meta, scaling: float, window: int | None, softcap: float | None,
            borrowed: bool = False):
    """Attention of one layer over the batch ``meta`` describes: ``[N, T, Hq, D]``, as transformers expects.
    ``borrowed``: the inputs belong to a compiled graph (see :func:`_prefill`)."""
    if isinstance(meta, PrefillMeta):
        out = _prefill(layer, query, key, value, meta, scaling, window, softcap, borrowed)
    else:
        out = _decode(layer, query, key, value, meta, scaling, window, softcap)
    return out.transpose(1, 2).contiguous()


class Batch:
    """The forward pass running in this thread: its attention metadata and the decoder layer now running."""

    __slots__ = ("meta", "layer")

    def __init__(self, meta: PrefillMeta | DecodeMeta):
        self.meta = meta
        self.layer = -1
        """Set by the caller before each layer: the compiled graph is one layer's, shared by every layer, so
        the operator cannot take the layer's index as a constant (a new graph per layer)."""


_BATCH: contextvars.ContextVar = contextvars.ContextVar("seesaw_attention_batch", default=None)
"""The :class:`Batch` running in this thread (:func:`batch`). A context variable rather than an argument
because the metadata (callbacks into the KV tiers, Python lists) cannot cross ``torch.compile``'s graph: the
operator below carries only tensors and numbers, and reads the rest here, as vLLM's forward context does."""


@contextlib.contextmanager
def batch(meta: PrefillMeta | DecodeMeta):
    """Make ``meta`` the metadata every attention call reads until the block ends (one forward pass); yields
    the :class:`Batch`, whose ``layer`` the caller sets before each layer it runs compiled."""
    current = Batch(meta)
    token = _BATCH.set(current)
    try:
        yield current
    finally:
        _BATCH.reset(token)


def _current_batch() -> Batch:
    current = _BATCH.get()
    if current is None:
        raise RuntimeError("seesaw attention called outside a forward pass (no `attention.batch(meta)` block)")
    return current


@torch.library.custom_op("seesaw::attention", mutates_args=())
def attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, window: int,
                 softcap: float) -> torch.Tensor:
    """One layer's attention as one opaque operator, so that a compiled graph keeps it whole and does not
    break there: query ``[N, Hq, T, D]``, key/value ``[N, Hkv, T, D]`` -> ``[N, T, Hq, D]``; ``window`` and
    ``softcap`` are 0 when unset. The layer and the batch come from :func:`batch`. It also writes the new K/V
    into the batch's KV sink or cache (state outside the graph, which nothing in the graph reads)."""
    current = _current_batch()
    return _attend(current.layer, query, key, value, current.meta, scaling, window or None, softcap or None,
                   borrowed=True)


@attention_op.register_fake
def _attention_shape(query, key, value, scaling, window, softcap):
    batch_size, heads, tokens, head_dim = query.shape
    return query.new_empty((batch_size, tokens, heads, head_dim))


_PASSED_THROUGH = frozenset({"position_ids", "position_embeddings", "cache_position", "use_cache",
                             "output_attentions", "cache", "past_key_values", "is_causal"})
"""Keywords transformers' layers pass along that do not change attention here (positions are already in the
rotary embedding, the cache is seesaw's own, masking is causal)."""


def seesaw_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, seesaw=None, **kwargs):
    """transformers attention function: the batch's prefill or decode path (:func:`batch` gives the metadata;
    ``seesaw=`` passes it explicitly). Under ``torch.compile`` it is the :func:`attention_op` operator; in
    eager mode the same code is called directly (no operator dispatch per layer)."""
    unknown = sorted(name for name, val in kwargs.items() if name not in _PASSED_THROUGH and val is not None)
    if unknown or dropout:
        raise NotImplementedError(f"seesaw attention does not implement {unknown or ['dropout']} "
                                  f"(passed by {type(module).__name__}); refusing rather than ignoring it")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if seesaw is None and torch.compiler.is_compiling():
        return attention_op(query, key, value, float(scaling), int(sliding_window or 0), float(softcap or 0.0)), None
    meta = seesaw if seesaw is not None else _current_batch().meta
    return _attend(module.layer_idx, query, key, value, meta, scaling, sliding_window, softcap), None


def register() -> str:
    """Register the attention function with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTENTION_NAME, seesaw_attention)
    return ATTENTION_NAME
