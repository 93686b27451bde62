"""The host staging tier: every staged sequence's KV in node-shared memory, in a layout-neutral order.

One area per instance and node, shaped ``[layer, k|v, kv_head, token_slot, head_dim]`` so that the slice any
rank needs under any layout (its layers, its KV heads, a sequence's slots) is a few contiguous reads.
A sequence occupies a few contiguous *extents* of token slots handed out by the instance leader
(:class:`ExtentAllocator`): first fit, split across free runs when no single run is long enough, so an
allocation succeeds whenever enough slots are free and the scheduler's token counts are exact.

- **swap-out** (prefill, or eviction during decode): each rank writes its share (its layers, its KV heads)
  into its own node's area, on a background thread so the copy overlaps the rest of the forward pass;
- **swap-in** (decode): each rank pulls its decode-layout share into the device tier. Pieces written on
  its node are read from shared memory, layer by layer on a background thread that the attention of each
  layer waits for (so later layers copy while earlier ones compute); pieces written on another node come
  point-to-point from their writer, following :func:`seesaw_ds.kv.plan.plan_kv_reshard`, as host tensors
  through the world group's CPU (gloo) twin, never through a device group (NCCL takes no host memory).

How the bytes cross between host and device (pinned blocks, a side stream and per-layer events on an
accelerator; direct copies on a CPU) is :mod:`seesaw_ds.kv.transfer`. :class:`HostKV` is the part that needs
no MPI: the area as a tensor, and the copies into and out of it.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.distributed.groups import Topology
from seesaw_ds.distributed.hostmem import NodeSharedBuffer
from seesaw_ds.distributed.waits import settle
from seesaw_ds.distributed.layout import ModelDims, kv_head_range, layer_range
from seesaw_ds.kv.blocks import leading_pieces
from seesaw_ds.kv.plan import kv_writes, plan_kv_reshard
from seesaw_ds.kv.sizing import node_shared_available_bytes, warm_units
from seesaw_ds.kv.transfer import DeviceCopies, LayerReady

log = logging.getLogger(__name__)


def one_openmp_thread() -> None:
    """Make the calling thread run torch's CPU operators on itself alone, leaving the other threads' setting.

    The copy thread's copies are memory-bound, and a thread of its own already overlaps them with the
    forward. Left alone, its first parallel operator takes torch's process-wide thread count (at::parallel_for
    initialises each new thread from it) and makes an OpenMP team of its own; libgomp then manages more threads
    than there are CPUs and cuts every team's spin-wait short, so the forward's own worker sleeps between
    operators: a rank with 2 cores ran its decode steps in 41 ms against 26-28 ms for the bare forward
    (docs/benchmarks.md). ``torch.get_num_threads()`` does this thread's lazy initialisation first, then
    OpenMP's per-thread setting is lowered to 1 (``torch.set_num_threads`` would change every thread's)."""
    torch.get_num_threads()
    try:
        import ctypes

        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)  # torch's own libgomp, already loaded under that name
    except (OSError, AttributeError):  # another OpenMP runtime, or none: nothing shared to spin
        pass


class StagingCapacityError(ValueError):
    """The staging area cannot fit in host memory; the message names the sizes and the fix."""


def bytes_per_token(dims: ModelDims, dtype: torch.dtype) -> int:
    """Host bytes one token of KV takes (all layers, K and V, all KV heads)."""
    return dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * torch.empty((), dtype=dtype).element_size()


def staging_capacity(requested: int | None, dims: ModelDims, dtype: torch.dtype, areas_on_node: int,
                     fraction: float) -> int:
    """Tokens of staging per instance: ``requested`` if it fits in available memory, else a clear error."""
    per_token = bytes_per_token(dims, dtype)
    available = node_shared_available_bytes()  # MemAvailable, the cgroup's headroom, /dev/shm's free space
    if requested is None:
        tokens = int(available * fraction) // (per_token * max(1, areas_on_node))
        if tokens < 1:
            raise StagingCapacityError(f"no host memory left for a KV staging area ({available >> 20} MiB "
                                       f"available); set kv.host_tokens explicitly")
        return tokens
    if requested < 1:
        raise StagingCapacityError(f"kv.host_tokens={requested} must be positive")
    needed = requested * per_token * max(1, areas_on_node)
    if needed > available:
        fit = available // (per_token * max(1, areas_on_node))
        raise StagingCapacityError(
            f"kv.host_tokens={requested} needs {needed >> 20} MiB of host memory per node but only "
            f"{available >> 20} MiB are available; use kv.host_tokens<={fit}")
    return requested


class ExtentAllocator:
    """Token slots of the staging area as sorted free runs (pure, leader-side).

    Extents may be shared: ``allocate(tokens, refs=k)`` hands out extents that k holders reference (the
    prompt KV of a request's k samples, staged once); each holder's ``free`` drops one reference and the slots
    return to the free list with the last one.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (start, length)
        self._refs: dict[tuple[int, int], int] = {}  # shared extents -> holders left (absent: one holder)
        self.used = 0

    def allocate(self, tokens: int, *, refs: int = 1) -> list[tuple[int, int]]:
        """Extents ``(start, length)`` covering ``tokens`` slots: one run when one fits, else several;
        ``refs`` holders free them (each once) before their slots are free again."""
        if refs < 1:
            raise ValueError(f"refs={refs} must be >= 1")
        if tokens > self.capacity - self.used:
            raise MemoryError(f"staging area full: {tokens} slots asked, {self.capacity - self.used} free")
        extents = self._take(tokens)
        self.used += tokens
        if refs > 1:
            self._refs.update((extent, refs) for extent in extents)
        return extents

    def _take(self, tokens: int) -> list[tuple[int, int]]:
        for index, (start, length) in enumerate(self._free):
            if length >= tokens:
                self._free[index:index + 1] = [(start + tokens, length - tokens)] if length > tokens else []
                return [(start, tokens)]
        extents, remaining = [], tokens
        while remaining:
            start, length = self._free[0]
            take = min(length, remaining)
            extents.append((start, take))
            self._free[0:1] = [(start + take, length - take)] if length > take else []
            remaining -= take
        return extents

    def share(self, extents: list[tuple[int, int]], refs: int = 1) -> None:
        """``refs`` more holders of allocated ``extents`` (a cached prompt prefix reused by a new sequence)."""
        for extent in map(tuple, extents):
            self._refs[extent] = self.refs(extent) + refs

    def refs(self, extent: tuple[int, int]) -> int:
        """Holders an allocated extent has left (1 unless it was allocated shared)."""
        return self._refs.get(tuple(extent), 1)

    def free(self, extents: list[tuple[int, int]]) -> None:
        """Drop one holder of each extent; return those without holders to the free list, merging neighbours."""
        released = []
        for extent in map(tuple, extents):
            left = self._refs.pop(extent, 1) - 1
            if left:
                self._refs[extent] = left
            else:
                released.append(extent)
        runs = sorted(self._free + released)
        merged: list[tuple[int, int]] = []
        for start, length in runs:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged
        self.used -= sum(length for _, length in released)


@dataclass
class StagedSeq:
    """Where a staged sequence's KV lies and who wrote it."""

    seq_id: int
    extents: list[tuple[int, int]]
    num_tokens: int
    writer: str           # layout name that wrote it ("prefill" or "decode")
    writer_replica: int
    reader_replica: int = 0
    final_tokens: int = 0  # the length it may reach (prompt + max_tokens): device blocks are reserved for it
    shared: tuple[object, int] | None = None
    """(key, tokens): its first `tokens` tokens are a prefix other sequences share (a common prompt prefix,
    or the prompt of a request's n samples): the device tier holds that prefix's whole blocks once."""


@dataclass
class TransferStats:
    """Bytes and seconds of KV movement, and how much of it the compute hid."""

    swap_out_bytes: int = 0
    """KV bytes written from the device tier (or a prefill) into the staging area."""
    swap_out_seconds: float = 0.0
    """Time the copy thread spent on those writes."""
    swap_out_wait_seconds: float = 0.0
    """Time steps waited for them (the rest ran behind compute)."""
    swap_in_bytes: int = 0
    """KV bytes read from the staging area into the device tier."""
    swap_in_seconds: float = 0.0
    """Time the copy thread spent on those reads."""
    swap_in_wait_seconds: float = 0.0
    """Time steps waited for them."""
    remote_bytes: int = 0
    """Bytes of KV pieces that came from another node (through the world group's gloo twin)."""
    swap_in_shared_tokens: int = 0
    """Tokens a swap-in found already in the device tier (a shared prefix's blocks), so did not copy."""
    events: list = field(default_factory=list)


class HostKV:
    """A staging tensor ``[layer, k|v, kv_head, token_slot, head_dim]`` and the copies into and out of it,
    made on one background thread. Needs no MPI: ``kv`` may be any host tensor.

    ``mapped`` is the area as the compute device addresses it: on an accelerator its view in the device's
    address space (page-locked memory mapped for the device, :func:`mapped_view`), through which swaps run as
    device copies straight between the area and the paged cache; None where there is none (copies then go
    through pinned bounce blocks). On a CPU it is the area itself."""

    def __init__(self, kv: torch.Tensor, dims: ModelDims, dtype: torch.dtype, copies: DeviceCopies,
                 mapped: torch.Tensor | None = None):
        self.kv = kv
        self.mapped = mapped if copies.enabled else kv
        self.dims = dims
        self.dtype = dtype
        self.capacity = kv.shape[3]
        self.copies = copies
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seesaw-kv",
                                          initializer=lambda: (one_openmp_thread(), copies.streams.bind_thread()))
        self._pending: list[Future] = []
        self.stats = TransferStats()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ swap-out
    def sink(self, batch, bounds: list[int], heads: range, head_lo: int, head_hi: int):
        """A prefill sink: rows ``head_lo:head_hi`` of each layer's K/V (global KV ``heads``) of every
        sequence of ``batch`` (``bounds`` in the packed row) into its extents, asynchronously."""
        def write(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            self._write_async(layer, heads, keys[head_lo:head_hi], values[head_lo:head_hi],
                              [(seq.staging_extents, lo, hi) for seq, lo, hi in zip(batch, bounds[:-1], bounds[1:])])
        return write

    def write_sequence(self, layer: int, staged: StagedSeq, keys: torch.Tensor, values: torch.Tensor,
                       heads: range) -> None:
        """Write one sequence's K/V (``[kv_heads, tokens, head_dim]`` for global ``heads``) into its extents:
        at once on a CPU; on an accelerator queued, done by :meth:`finish_writes`."""
        if not self.copies.enabled:
            self._store(layer, 0, heads, staged.extents, keys)
            self._store(layer, 1, heads, staged.extents, values)
            self.stats.swap_out_bytes += 2 * keys.numel() * keys.element_size()
            return
        self._write_async(layer, heads, keys, values, [(staged.extents, 0, keys.shape[1])])

    def _write_async(self, layer: int, heads: range, keys: torch.Tensor, values: torch.Tensor, spans) -> None:
        """Store ``keys``/``values`` ``[heads, T, head_dim]`` on the copy thread: token columns ``lo:hi`` of
        each ``(extents, lo, hi)`` into those extents. On an accelerator, device kernels write them into the
        mapped area on the side stream, or (unmapped) they first go to a pinned block on the side stream; the
        copy thread waits for either. On a CPU it reads them directly."""
        copies = self.copies
        with self._lock:
            self.stats.swap_out_bytes += 2 * keys.numel() * keys.element_size()
        if copies.enabled and self.mapped is not None:  # device kernels write the mapped area: no bounce block
            copies.begin()
            event = copies.on_side(lambda: self._store_spans(self.mapped, layer, heads, keys, values, spans),
                                   keep=(keys, values))
            self._pending.append(self._worker.submit(self._wait_for, event))
            return
        event = None
        if copies.enabled:
            block, event = copies.download(keys, values)
            keys, values = block[0], block[1]

        def copy() -> float:
            began = time.perf_counter()
            copies.streams.synchronize(event)
            self._store_spans(self.kv, layer, heads, keys, values, spans)
            return time.perf_counter() - began
        self._pending.append(self._worker.submit(copy))

    def _wait_for(self, event) -> float:
        """The copy thread's part of a swap-out made by device kernels: wait until they are done."""
        began = time.perf_counter()
        self.copies.streams.synchronize(event)
        return time.perf_counter() - began

    def _store_spans(self, area: torch.Tensor, layer: int, heads: range, keys: torch.Tensor, values: torch.Tensor,
                     spans) -> None:
        for extents, lo, hi in spans:
            self._store(layer, 0, heads, extents, keys[:, lo:hi], area)
            self._store(layer, 1, heads, extents, values[:, lo:hi], area)

    def finish_writes(self) -> None:
        """Wait for outstanding swap-out copies (before the blocks are read or the step is reported)."""
        began = time.perf_counter()
        copied = sum(future.result() for future in self._pending)
        self._pending = []
        self.stats.swap_out_seconds += copied
        self.stats.swap_out_wait_seconds += time.perf_counter() - began

    def _store(self, layer: int, kv_index: int, heads: range, extents, data: torch.Tensor,
               area: torch.Tensor | None = None) -> None:
        """Write ``data`` (``[heads, tokens, head_dim]``) into a sequence's extents, from its first token, through
        ``area`` (the area or its mapped view; default the area)."""
        area = self.kv if area is None else area
        for start, offset, take in leading_pieces(extents, data.shape[1]):
            area[layer, kv_index, heads.start:heads.stop, start:start + take] = data[:, offset:offset + take]

    # ------------------------------------------------------------ reads
    def read(self, layer: int, heads: range, extents, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first ``tokens`` K and V of one layer and global KV ``heads``, each ``[heads, tokens,
        head_dim]`` (views of the area when the sequence is one extent): a cached prompt prefix, read by the
        prefill ranks that wrote it (or their node's neighbours) as the context of the prompts reusing it."""
        block = self._load(range(layer, layer + 1), heads, extents, tokens)[0]
        return block[0], block[1]

    def _load(self, layers: range, heads: range, extents, tokens: int, area: torch.Tensor | None = None
              ) -> torch.Tensor:
        """A sequence's K/V for ``layers`` x ``heads``: ``[layers, 2, heads, tokens, head_dim]`` (a view of
        the area when the sequence is one extent), read through ``area`` (the area or its mapped view)."""
        area = self.kv if area is None else area
        parts = [area[layers.start:layers.stop, :, heads.start:heads.stop, start:start + take]
                 for start, _, take in leading_pieces(extents, tokens)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)

    def _gather(self, target: torch.Tensor, layers: range, heads: range, extents, tokens: int) -> None:
        """Copy a sequence's K/V into ``target`` (``[layers, 2, heads, tokens, head_dim]``), extent by extent."""
        for start, offset, take in leading_pieces(extents, tokens):
            target[:, :, :, offset:offset + take].copy_(
                self.kv[layers.start:layers.stop, :, heads.start:heads.stop, start:start + take])

    def swap_in_pieces(self, cache, local_reads, received, heads: range, present: dict[int, int] | None = None
                       ) -> "SwapIn":
        """Start copying into ``cache`` (layer by layer, on the copy thread): ``local_reads`` ``(staged,
        piece)`` read from this area, ``received`` ``(staged, piece, block)`` already in host blocks;
        ``heads`` are the cache's global KV heads; ``present[seq_id]``: its first tokens already in the cache
        (not copied)."""
        return SwapIn(self, cache, local_reads, received, heads, present or {})

    def close_worker(self) -> None:
        """Let queued copies finish and stop the copy thread."""
        self._worker.shutdown(wait=True)


def first_touch_slots(kv: torch.Tensor, slots: int, rank: int, size: int) -> None:
    """Touch the first ``slots`` token slots of every row of the area ``kv``; node rank ``rank`` of ``size``
    touches its share of the layers.

    Why: the area is shared memory that no page of is backed until written, and its rows lie
    ``capacity x head_dim`` elements apart, so the first prefill step's swap-out faults in fresh pages in
    every row, on the copy thread, beside the forward. On a rank with two OpenMP threads on two cores that
    first step took 1.31-1.36 s against 0.50 s for the same prompt again (SmolLM2, 493 tokens; each layer's copy
    26-88 ms against 0.1 ms, and every layer of the forward ~2x slower beside it); with its slots touched
    first the copies take what later steps' do. The extent allocator hands out the lowest free slots
    first, so the slots touched here are the ones the first steps write."""
    mine = layer_range(kv.shape[0], size, rank)
    if slots > 0 and len(mine):
        kv[mine.start:mine.stop, :, :, :slots].zero_()


def checked_mapping(kv: torch.Tensor, mapped: torch.Tensor | None, slot: int) -> torch.Tensor | None:
    """``mapped`` (the area ``kv`` as a device sees it) where it reads what the host wrote and the host reads
    what it wrote, else None; checked once, on token slot ``slot`` of layer 0 (each node rank its own, before
    anything is staged). Both ways a swap reaches the area are checked: device kernels reading and writing it
    (strided pieces), and ``copy_`` between a contiguous piece of it and a device tensor, which torch runs as a
    memory copy (``cudaMemcpyAsync``) on the mapped host address (a rank holding one KV head swaps so)."""
    if mapped is None:
        return None
    slot %= kv.shape[3]
    row, seen = kv[0, 0, 0, slot], mapped[0, 0, 0, slot]
    pattern = (torch.arange(row.numel(), dtype=torch.float32) % 61 + slot).to(kv.dtype)

    def settled() -> None:
        if mapped.device.type == "cuda":
            torch.cuda.synchronize(mapped.device)

    try:
        row.copy_(pattern)
        read_ok = torch.equal((seen * 1).cpu(), pattern)   # a device kernel reading the mapped host memory
        seen.neg_()                                         # and one writing it
        settled()
        written_ok = torch.equal(row, pattern.neg())
        on_device = torch.zeros_like(seen)
        on_device.copy_(seen)                               # a memory copy from the mapped host memory
        copied_ok = torch.equal(on_device.cpu(), pattern.neg())
        seen.copy_(on_device.neg())                         # and one into it
        settled()
        copied_back_ok = torch.equal(row, pattern)
    except RuntimeError:
        return None
    return mapped if read_ok and written_ok and copied_ok and copied_back_ok else None


class StagingArea(HostKV):
    """This rank's handle on its instance's staging area (collective over the instance to create)."""

    def __init__(self, topology: Topology, dims: ModelDims, dtype: torch.dtype, capacity_tokens: int,
                 warm_tokens: int = 0):
        self.topology = topology
        env = topology.env
        self._comm = env.node.Split(color=topology.instance_index, key=env.rank)
        shape = (dims.num_layers, 2, dims.num_kv_heads, capacity_tokens, dims.head_dim)
        element = torch.empty((), dtype=dtype).element_size()
        nbytes = element * dims.num_layers * 2 * dims.num_kv_heads * capacity_tokens * dims.head_dim
        pin = torch.cuda.is_available()
        self._buffer = NodeSharedBuffer(self._comm, nbytes, pin=pin)
        kv = self._buffer.view(0, shape, dtype)
        if not pin:  # a pinned area was touched whole already
            first_touch_slots(kv, warm_units(warm_tokens, capacity_tokens, nbytes // max(capacity_tokens, 1)),
                              self._comm.Get_rank(), self._comm.Get_size())
            settle(self._comm)
            self._comm.Barrier()
        backend.register_host_memory(kv)
        device = backend.device()
        mapped = None
        if pin:  # collective: every node rank joins the count, mapped or not
            if self._buffer.pinned:
                mapped = checked_mapping(kv, backend.mapped_view(kv, device), self._comm.Get_rank())
            unmapped = self._comm.allreduce(int(mapped is None))
            if unmapped and self._comm.Get_rank() == 0:
                log.info("seesaw_ds: the KV staging area has no working device mapping on %d of %d rank(s) of this "
                         "node: their swaps go through pinned bounce blocks (slower)", unmapped, self._comm.Get_size())
        super().__init__(kv, dims, dtype, DeviceCopies(backend.Streams(device)), mapped)

    def prefill_sink(self, batch, bounds: list[int], groups):
        """A prefill sink writing this rank's share of each sequence's new K/V into its extents, asynchronously."""
        share = kv_writes(groups.layout, self.dims, self.topology.instance_rank)
        if share is None:
            return lambda layer, keys, values: None
        _, heads = share
        local_heads = kv_head_range(self.dims.num_kv_heads, groups.layout.tp, groups.tp_index)
        head_lo = heads.start - local_heads.start
        return self.sink(batch, bounds, heads, head_lo, head_lo + len(heads))

    # ------------------------------------------------------------ swap-in
    def swap_in(self, seqs: list[StagedSeq], layout_name: str, cache) -> "SwapIn":
        """Pull every sequence's share for layout ``layout_name`` into ``cache`` (every instance rank calls).

        Remote pieces move point-to-point now, as host tensors through the host group; local pieces are
        copied layer by layer on the worker thread. Returns a handle whose ``wait(layer)`` blocks until
        that layer is in the device tier (on an accelerator: until the compute stream waits for it).
        """
        topology = self.topology
        me = topology.instance_rank
        dst_layout = topology.layouts[layout_name].layout
        node_of = lambda instance_rank: topology.node_of_rank[topology.instance_to_global(instance_rank)]
        local_reads, sends, recvs = [], [], []
        for staged in seqs:
            src_layout = topology.layouts[staged.writer].layout
            for piece in plan_kv_reshard(src_layout, staged.writer_replica, dst_layout, staged.reader_replica,
                                         self.dims):
                remote = node_of(piece.src_rank) != node_of(piece.dst_rank)
                if piece.dst_rank == me:
                    (recvs if remote else local_reads).append((staged, piece))
                elif piece.src_rank == me and remote:
                    sends.append((staged, piece))
        handles = []
        for staged, piece in sends:
            block = self._host_block(staged, piece)
            self._gather(block, piece.layers, piece.kv_heads, staged.extents, staged.num_tokens)
            handles.append(backend.host_isend(block, topology.instance_to_global(piece.dst_rank), topology.host_world))
        received = []
        for staged, piece in recvs:
            block = self._host_block(staged, piece)
            backend.host_recv(block, topology.instance_to_global(piece.src_rank), topology.host_world)
            received.append((staged, piece, block))
            self.stats.remote_bytes += block.numel() * block.element_size()
        for handle in handles:
            handle.wait()
        mine = dst_layout.coords(me)
        my_heads = kv_head_range(self.dims.num_kv_heads, dst_layout.tp, mine[2])
        present: dict[int, int] = {}  # tokens a sequence finds in the device tier already (a shared prefix)
        for staged in seqs:
            if staged.reader_replica != mine[0]:
                continue
            if staged.shared is None:
                cache.allocator.ensure(staged.seq_id, staged.num_tokens, reserve_tokens=staged.final_tokens)
            else:
                present[staged.seq_id] = cache.allocator.ensure_shared(
                    staged.seq_id, staged.num_tokens, *staged.shared, reserve_tokens=staged.final_tokens)
                self.stats.swap_in_shared_tokens += present[staged.seq_id]
        return self.swap_in_pieces(cache, local_reads, received, my_heads, present)

    def _host_block(self, staged: StagedSeq, piece) -> torch.Tensor:
        """A host transfer block for one piece: ``[layers, 2, heads, tokens, head_dim]``."""
        shape = (len(piece.layers), 2, len(piece.kv_heads), staged.num_tokens, self.dims.head_dim)
        return backend.host_empty(shape, self.dtype)

    def close(self) -> None:
        """Stop the worker and release the shared memory (collective over the instance's node ranks); a
        second call does nothing (the communicator is freed by the first)."""
        if self.kv is None:
            return
        self.close_worker()
        self.mapped = None  # the device view goes before the memory under it
        self._comm.Barrier()
        backend.unregister_host_memory(self.kv)
        self.kv = None
        self._buffer.free()
        self._comm.Free()


class SwapIn:
    """An in-flight swap-in: layers land in the device tier in order; ``wait(layer)`` blocks on one.

    On a CPU the copy thread writes each layer's pieces straight from the area (or a received block) into
    the cache; on an accelerator the same code runs as device copies from the area's mapped view, queued on the
    side stream (received blocks, and every piece where the area is not mapped, through
    :meth:`DeviceCopies.upload_layer`). Either way it then publishes the layer to
    :class:`~seesaw_ds.kv.transfer.LayerReady`.
    """

    def __init__(self, area: HostKV, cache, local_reads, received, heads: range, present: dict[int, int]):
        self.area = area
        self.present = present
        by_layer: dict[int, list] = {layer: [] for layer in cache.layers}
        for staged, piece, block in received:
            for offset, layer in enumerate(piece.layers):
                by_layer[layer].append((staged, piece.kv_heads, block[offset]))
        for staged, piece in local_reads:
            for layer in piece.layers:
                by_layer[layer].append((staged, piece.kv_heads, None))
        element = torch.empty((), dtype=area.dtype).element_size()
        self.nbytes = sum(2 * len(kv_heads) * (staged.num_tokens - present.get(staged.seq_id, 0))
                          * area.dims.head_dim * element for items in by_layer.values() for staged, kv_heads, _ in items)
        compute = area.copies.begin()  # blocks being filled may still be read by work queued before
        self.ready = LayerReady(cache.layers, area.copies.streams, compute)
        self._future = area._worker.submit(self._copy, cache, by_layer, heads)

    def _copy(self, cache, by_layer, heads: range) -> float:
        began = time.perf_counter()
        area, copies = self.area, self.area.copies
        try:
            for layer in cache.layers:
                items = [item for item in by_layer[layer] if self._copies(item[0])]
                if not copies.enabled:
                    self._write_layer(cache, layer, items, heads)
                    event = None
                elif area.mapped is not None:  # device copies straight from the mapped area; received blocks uploaded
                    received = [item for item in items if item[2] is not None]
                    if received:
                        copies.upload_layer(cache, layer, [self._piece(layer, item, heads) for item in received])
                    local = [item for item in items if item[2] is None]
                    event = copies.on_side(lambda: self._write_layer(cache, layer, local, heads))
                else:
                    event = copies.upload_layer(cache, layer, [self._piece(layer, item, heads) for item in items])
                self.ready.publish(layer, event)
            copies.streams.synchronize(self.ready.last_event)  # the thread's time is the copy's
        finally:
            self.ready.release_all()
        return time.perf_counter() - began

    def _write_layer(self, cache, layer: int, items, heads: range) -> None:
        """Write one layer's pieces into ``cache``: local pieces read through the area as the cache's device
        addresses it (on a CPU the area, on a GPU its mapped view: a view, no copy), received ones from their
        host blocks."""
        area = self.area
        for staged, kv_heads, block in items:
            skip = self.present.get(staged.seq_id, 0)
            if block is None:
                block = area._load(range(layer, layer + 1), kv_heads, staged.extents, staged.num_tokens,
                                   area.mapped)[0]
            lo, hi = kv_heads.start - heads.start, kv_heads.stop - heads.start
            cache.write_heads(layer, staged.seq_id, block[0, :, skip:], block[1, :, skip:], lo, hi, start=skip)

    def _copies(self, staged: StagedSeq) -> bool:
        """Does the sequence have tokens to copy (not all of it already in the device tier)?"""
        return self.present.get(staged.seq_id, 0) < staged.num_tokens

    def _piece(self, layer: int, item, heads: range):
        staged, kv_heads, block = item
        skip = self.present.get(staged.seq_id, 0)
        shape = (2, len(kv_heads), staged.num_tokens - skip, self.area.dims.head_dim)
        if block is None and not skip:
            fill = lambda target: self.area._gather(target[None], range(layer, layer + 1), kv_heads,
                                                    staged.extents, staged.num_tokens)
        elif block is None:
            fill = lambda target: target.copy_(self.area._load(range(layer, layer + 1), kv_heads, staged.extents,
                                                               staged.num_tokens)[0][:, :, skip:])
        else:
            fill = lambda target: target.copy_(block[:, :, skip:])
        return staged.seq_id, kv_heads.start - heads.start, kv_heads.stop - heads.start, shape, fill, skip

    def wait(self, layer: int) -> None:
        """Block until ``layer`` of every swapped-in sequence is in the device tier (on an accelerator:
        until the compute stream is ordered after its copies)."""
        self.ready.wait(layer)

    def finish(self) -> None:
        """Wait for the whole swap-in and account for it."""
        began = time.perf_counter()
        copied = self._future.result()
        self.ready.wait_all()
        stats = self.area.stats
        stats.swap_in_bytes += self.nbytes
        stats.swap_in_seconds += copied
        stats.swap_in_wait_seconds += self.ready.waited + time.perf_counter() - began
