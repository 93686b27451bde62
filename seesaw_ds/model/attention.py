"""Ragged, paged attention plugged into transformers' ``AttentionInterface``.

The transformers decoder layers run unchanged; their attention call lands in :func:`seesaw_attention`,
which reads the per-batch metadata passed down as the ``seesaw`` keyword:

- **prefill**: many sequences of different lengths packed into one row of ``T`` tokens (no padding);
  causal attention within each sequence over its in-batch keys, and the new K/V handed to a *sink* (the
  host staging area, or the device tier) in head-major order;
- **decode**: one new token per sequence, batched as ``[N, heads, 1, head_dim]``; its K/V are written into
  the paged device-tier cache and attention reads each sequence's blocks.

Each path is one call per layer into a backend: on a CPU, ``kernels.py`` (the decode step over the block
table: the new K/V written and attention, one C++ call; and the packed prefill loop in C++); on an
accelerator, ``device_attention.py`` (variable-length flash attention for the packed prefill, the paged Triton
decode kernel on CUDA). Decode reads
only tensors (:class:`DecodeMeta`: views of the executor's persistent step buffers) and one host-known int.
Where neither kernel applies (an accelerator without Triton, or no compiler on a CPU), decode gathers each
sequence's whole blocks through the block table into one batch padded to the step's longest sequence, once
per layer, and computes grouped scores with two batched matmuls (:func:`_decode_padded`: twice the KV traffic
of a paged kernel, but no per-sequence launches, no host sync and no per-shape set-up); the per-sequence SDPA
path is kept as the tests' reference. Attention logit soft-capping (Gemma 2) is ``cap * tanh(scores / cap)``
before the mask and float32 softmax, as transformers' eager attention. Any other keyword argument a family's
attention module passes, and that this function does not implement, is refused rather than ignored.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import AttentionInterface

from seesaw_ds.kv.blocks import blocks_for, leading_pieces, runs
from seesaw_ds.model import device_attention, kernels
from seesaw_ds.model.attention_reference import one_token as _one_token
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
    """Decode batch over the paged cache, one new token per sequence: views of the executor's persistent step
    buffers (:mod:`seesaw_ds.model.decode_step`), read as they are by every layer; nothing here is Python per
    sequence, and nothing a layer does with it waits on the device."""

    cache: "object"                 # seesaw_ds.kv.device.DeviceKVCache
    block_table: torch.Tensor       # [N, >= blocks] long: row n's first blocks_for(lengths[n]) entries are its blocks
    lengths: torch.Tensor           # [N] long: each sequence's KV tokens, the new one included
    write_slots: torch.Tensor       # [N] long: the new token's cache slot (block * block_size + offset)
    max_length: int                 # the longest of ``lengths``, known on the host (the padded path's width)
    ready: Callable[[int], None] | None = None  # blocks until a layer's swapped-in KV has landed
    reference: bool = False         # one SDPA call per sequence (the tests' reference) instead of the fast paths

    @classmethod
    def of(cls, cache, step, ready: Callable[[int], None] | None = None) -> "DecodeMeta":
        """The metadata of a filled :class:`~seesaw_ds.model.decode_step.DecodeStep`."""
        return cls(cache=cache, block_table=step.block_table, lengths=step.lengths, write_slots=step.write_slots,
                   max_length=step.max_length, ready=ready)

    @classmethod
    def over(cls, cache, spans: list[list[tuple[int, int]]], write_blocks: torch.Tensor, write_offsets: torch.Tensor,
             **fields) -> "DecodeMeta":
        """From each sequence's token spans as :meth:`DeviceKVCache.token_spans` gives them (whole blocks, the
        last run cut short) and the new tokens' blocks and offsets: the tests' way in."""
        size = cache.block_size
        tables = [[block for first, count in pieces
                   for block in range(first // size, (first + count - 1) // size + 1)] for pieces in spans]
        block_table = torch.zeros(len(spans), max(map(len, tables)), dtype=torch.long)
        for row, table in enumerate(tables):
            block_table[row, :len(table)] = torch.tensor(table, dtype=torch.long)
        lengths = [sum(count for _, count in pieces) for pieces in spans]
        return cls(cache=cache, block_table=block_table, lengths=torch.tensor(lengths, dtype=torch.long),
                   write_slots=write_blocks * size + write_offsets, max_length=max(lengths), **fields)

    def spans(self) -> list[list[tuple[int, int]]]:
        """Each sequence's KV as runs of consecutive token slots, read back on the host (the reference path)."""
        size = self.cache.block_size
        out = []
        for row, length in zip(self.block_table.tolist(), self.lengths.tolist()):
            block_runs = [(block * size, count * size) for block, count in runs(row[:blocks_for(length, size)])]
            out.append([(start, take) for start, _, take in leading_pieces(block_runs, length)])
        return out


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
    flat_keys, flat_values = cache.flat(layer)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not meta.reference and kernels.applies(flat_keys):  # the K/V write and attention in one call
        out = kernels.paged_decode_attention(query[:, :, 0], key[:, :, 0], value[:, :, 0], flat_keys, flat_values,
                                             meta.block_table, meta.lengths, meta.write_slots, cache.block_size,
                                             scale, window, softcap)
        return out[:, :, None]
    cache.write_slots(layer, meta.write_slots, key[:, :, 0], value[:, :, 0])
    if meta.reference:
        return _decode_reference(layer, query, meta, flat_keys, flat_values, scaling, window, softcap)
    out = device_attention.decode(query[:, :, 0], flat_keys, flat_values, meta.block_table, meta.lengths,
                                  meta.max_length, cache.block_size, scale, window, softcap)
    if out is not None:
        return out[:, :, None]
    return _decode_padded(query, meta, flat_keys, flat_values, scaling, window, softcap)


def _decode_padded(query, meta: DecodeMeta, flat_keys, flat_values, scaling, window, softcap=None):
    """Each sequence's blocks gathered whole from the block table into a padded batch as wide as the step's
    longest sequence (a width known on the host: no device sync), then grouped attention (:func:`_grouped`):
    query [N, Hq, 1, D], the cache views [slots, Hkv, D]. Only the last ``window`` tokens of a sequence are
    kept when set. Entries of a row past its sequence's blocks are other valid block numbers (or 0): read,
    then masked."""
    size = meta.cache.block_size
    width = blocks_for(meta.max_length, size)
    blocks = meta.block_table[:, :width]                                   # [N, W]
    shape = (-1, size, *flat_keys.shape[1:])
    keys = flat_keys.view(shape)[blocks].flatten(1, 2).transpose(1, 2)     # [N, Hkv, W * size, D]
    values = flat_values.view(shape)[blocks].flatten(1, 2).transpose(1, 2)
    token = torch.arange(width * size, device=query.device)[None, :]
    lengths = meta.lengths[:, None]
    valid = token < lengths
    if window:
        valid = valid & (token >= lengths - window)
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
    outputs = []
    for one_query, spans in zip(query.split(1), meta.spans()):
        keys, values = meta.cache.sequence_kv(layer, spans, flat_keys, flat_values)  # one span: a view
        if window and keys.shape[1] > window:
            keys, values = keys[:, -window:], values[:, -window:]
        outputs.append(_one_token(one_query, keys, values, scaling, softcap))
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
