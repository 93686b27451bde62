"""KV between host memory and the device tier, beside compute: pinned blocks, a side stream, per-layer events.

On an accelerator (streams from :class:`seesaw_ds.backends.deepspeed.Streams`):

- **swap-in**, layer by layer on the staging area's copy thread: a layer's pieces are gathered into one
  contiguous block of pinned host memory (the strided read of the staging area happens there, host side),
  the block goes to the device in one asynchronous copy on the *side stream*, and is scattered there into
  the paged cache; an event recorded after it marks the layer ready. The layer's attention waits for it
  on the device (:class:`LayerReady`): the host blocks only until the layer's copies are *queued*, the
  compute stream waits for the event, so layer ``l+1`` moves while layer ``l`` computes.
- **swap-out**: a layer's new K/V are copied from the device into one pinned block on the side stream,
  ordered after the compute that produced them; the copy thread waits for that copy's event and writes the
  block into the staging area while the forward pass goes on.

Where the pinned staging area is mapped into the device's address space (the usual case on a 64-bit system,
:func:`seesaw_ds.backends.accelerator.mapped_view`), neither bounce block is used: the copies run as device
kernels between the paged cache and the area itself, across PCIe, on the side stream (:meth:`DeviceCopies.on_side`),
the same code as on the host. Pieces received from another node stay host blocks and take the upload above.

On the host (CPU) the streams are no-ops: the staging area and the cache are both host memory, and the copy
thread writes from one into the other directly, with no block in between.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from seesaw_ds.backends import deepspeed as backend


class LayerReady:
    """Per-layer hand-off from the copy thread (``publish``) to the compute thread (``wait``).

    ``publish(layer, event)`` comes after the layer's copies are queued on the side stream (on the host:
    done), ``event`` recorded after them (None on the host). ``wait(layer)`` blocks the host until the
    layer is published, then makes the compute stream wait for its event, once.
    """

    def __init__(self, layers: range, streams, compute_stream):
        self._streams = streams
        self._compute = compute_stream
        self._published = {layer: threading.Event() for layer in layers}
        self._events: dict[int, object] = {}
        self._joined: set[int] = set()
        self.last_event = None
        self.waited = 0.0

    def publish(self, layer: int, event) -> None:
        """Layer ``layer`` is queued (layers are published in order)."""
        self._events[layer] = event
        self.last_event = event
        self._published[layer].set()

    def release_all(self) -> None:
        """Wake every waiter (the copy thread ended, possibly with an error that ``finish`` re-raises)."""
        for flag in self._published.values():
            flag.set()

    def wait(self, layer: int) -> None:
        """Block until ``layer`` is published, then order the compute stream after its copies."""
        flag = self._published.get(layer)
        if flag is None or layer in self._joined:
            return
        if not flag.is_set():
            began = time.perf_counter()
            flag.wait()
            self.waited += time.perf_counter() - began
        event = self._events.get(layer)
        if event is not None:  # None: on the host, or the copy thread failed (finish re-raises its error)
            self._streams.wait(self._compute, event)
        self._joined.add(layer)

    def wait_all(self) -> None:
        for layer in self._published:
            self.wait(layer)


class DeviceCopies:
    """The side stream of one rank's KV copies and the two kinds of copy made on it."""

    def __init__(self, streams):
        self.streams = streams
        self.enabled = streams.enabled
        self.side = streams.new_stream()

    def begin(self):
        """Order the side stream after what the calling thread queued so far on its own (compute) stream,
        which is returned: blocks about to be written may still be read there, K/V about to be read are
        still being produced there."""
        compute = self.streams.current()
        self.streams.wait_stream(self.side, compute)
        return compute

    def on_side(self, write: Callable[[], None], keep: tuple[torch.Tensor, ...] = ()):
        """Queue ``write``'s kernels (copies between device tensors and the mapped staging area) on the side
        stream; returns the event after them. ``keep``: device tensors they read that the compute stream may
        free meanwhile. (A swap-out's caller orders the side stream after compute first: :meth:`begin`.)"""
        with self.streams.use(self.side):
            write()
            event = self.streams.record(self.side)
        for tensor in keep:
            self.streams.keep(tensor, self.side)
        return event

    def download(self, keys: torch.Tensor, values: torch.Tensor):
        """Queue a copy of ``keys``/``values`` (``[heads, T, head_dim]`` on the device) into one pinned host
        block ``[2, heads, T, head_dim]`` on the side stream. Returns the block and the event to wait for
        before reading it."""
        self.begin()
        with self.streams.use(self.side):
            block = backend.host_empty((2, *keys.shape), keys.dtype)
            block[0].copy_(keys, non_blocking=True)
            block[1].copy_(values, non_blocking=True)
            event = self.streams.record(self.side)
        self.streams.keep(keys, self.side)  # the compute stream may free them before the copy ran
        self.streams.keep(values, self.side)
        return block, event

    def upload_layer(self, cache, layer: int, pieces: list[tuple[int, int, int, tuple, Callable]]) -> object:
        """Queue one layer's pieces into ``cache`` on the side stream; returns the event after them.

        ``pieces``: ``(seq_id, head_lo, head_hi, shape [2, heads, T, head_dim], fill, start)``; ``fill(block)``
        writes the piece (the sequence's tokens from ``start`` on) into its part of the pinned host block (a
        host-side gather).
        """
        sizes = [2 * shape[1] * shape[2] * shape[3] for *_, shape, _, _ in pieces]
        if not pieces:
            return self.streams.record(self.side)
        with self.streams.use(self.side):
            host = backend.host_empty((sum(sizes),), cache.keys.dtype)
            offset = 0
            for (*_, shape, fill, _), size in zip(pieces, sizes):
                fill(host[offset:offset + size].view(shape))
                offset += size
            device = torch.empty(host.shape, dtype=host.dtype, device=cache.keys.device)
            device.copy_(host, non_blocking=True)
            offset = 0
            for (seq_id, head_lo, head_hi, shape, _, start), size in zip(pieces, sizes):
                block = device[offset:offset + size].view(shape)
                cache.write_heads(layer, seq_id, block[0], block[1], head_lo, head_hi, start=start)
                offset += size
            return self.streams.record(self.side)
