"""KV copies between the host staging tensor and the device tier (seesaw_ds/kv/transfer.py, staging.HostKV),
without processes: the CPU path (streams are no-ops, direct copies) against the accelerator path run on a CPU
with a recording fake of the streams, and the per-layer ready protocol between the copy thread and compute.

The accelerator path must put the same bytes in the same places as the CPU path, with every device-side
copy queued on the side stream, the side stream ordered after compute before it touches anything, and each
layer's attention ordered (on the device) after exactly that layer's event."""
from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.distributed.layout import ModelDims
from seesaw_ds.kv.device import DeviceKVCache
from seesaw_ds.kv.staging import HostKV, StagedSeq
from seesaw_ds.kv.transfer import DeviceCopies, LayerReady

DIMS = ModelDims(num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64, intermediate_size=128,
                 vocab_size=100)
CAPACITY = 64
BLOCK = 4


class FakeStream:
    def __init__(self, name: str):
        self.name = name


class FakeStreams:
    """A recording stand-in for backend.Streams on an accelerator: copies stay synchronous CPU copies, and
    every stream operation is logged with the stream the calling thread had current."""

    enabled = True

    def __init__(self):
        self.compute = FakeStream("compute")
        self.log: list[tuple] = []
        self._local = threading.local()
        self._events = 0
        self._lock = threading.Lock()

    def _add(self, *entry) -> None:
        with self._lock:
            self.log.append(entry)

    def new_stream(self):
        return FakeStream("side")

    def current(self):
        return getattr(self._local, "stream", self.compute)

    @contextlib.contextmanager
    def use(self, stream):
        previous = self.current()
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = previous

    def record(self, stream, timing: bool = False):
        with self._lock:
            self._events += 1
            event = ("event", self._events)
        self._add("record", stream.name, event)
        return event

    def wait(self, stream, event) -> None:
        self._add("wait", stream.name, event)

    def wait_stream(self, stream, other) -> None:
        self._add("wait_stream", stream.name, other.name)

    def synchronize(self, event) -> None:
        self._add("synchronize", event)

    def keep(self, tensor, stream) -> None:
        self._add("keep", stream.name)

    def bind_thread(self) -> None:
        self._add("bind", threading.current_thread().name)


def _area(streams, mapped: bool = False) -> HostKV:
    """The staging tensor; ``mapped``: on the (fake) accelerator, the area mapped into its address space (the
    copies are device kernels on the side stream straight between area and cache), else through pinned blocks."""
    kv = torch.zeros(DIMS.num_layers, 2, DIMS.num_kv_heads, CAPACITY, DIMS.head_dim)
    return HostKV(kv, DIMS, torch.float32, DeviceCopies(streams), kv if mapped else None)


def _cache(heads: int, streams=None) -> DeviceKVCache:
    cache = DeviceKVCache(range(DIMS.num_layers), 32, BLOCK, heads, DIMS.head_dim, torch.float32, torch.device("cpu"))
    cache.keys.zero_()  # the tier is not zero-filled; here whole caches are compared, unwritten slots too
    cache.values.zero_()
    if streams is not None:  # log which stream each cache write is queued on
        write_heads = cache.write_heads

        def logged(layer, *args, **kwargs):
            streams._add("write_heads", layer, streams.current().name)
            write_heads(layer, *args, **kwargs)
        cache.write_heads = logged
    return cache


def _seqs():
    """Two sequences: one in a single extent, one split over two."""
    return [SimpleNamespace(seq_id=1, tokens=7, staging_extents=[(0, 7)]),
            SimpleNamespace(seq_id=2, tokens=9, staging_extents=[(20, 5), (40, 4)])]


def _prefill_kv(layer: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(layer)
    keys = torch.randn(DIMS.num_kv_heads, total, DIMS.head_dim, generator=generator)
    return keys, -keys


def _fill(area: HostKV) -> None:
    """Prefill both sequences into the area through a sink holding KV heads 1..3 (local rows 1..3 of 4)."""
    seqs = _seqs()
    bounds = [0, 7, 16]
    sink = area.sink(seqs, bounds, range(1, 4), 1, 4)
    for layer in range(DIMS.num_layers):
        sink(layer, *_prefill_kv(layer, bounds[-1]))
    area.finish_writes()


@pytest.mark.parametrize("mapped", [False, True], ids=["bounce", "mapped"])
def test_swap_out_same_bytes_on_both_paths_and_device_path_orders_after_compute(mapped):
    cpu, fake_streams = _area(backend.Streams(torch.device("cpu"))), FakeStreams()
    fake = _area(fake_streams, mapped)
    assert not cpu.copies.enabled and fake.copies.enabled
    _fill(cpu)
    _fill(fake)
    assert torch.equal(cpu.kv, fake.kv)
    keys, values = _prefill_kv(2, 16)
    assert torch.equal(cpu.kv[2, 0, 1:4, 0:7], keys[1:4, 0:7])
    assert torch.equal(cpu.kv[2, 1, 1:4, 20:25], values[1:4, 7:12])
    assert torch.equal(cpu.kv[2, 1, 1:4, 40:44], values[1:4, 12:16])
    assert not cpu.kv[:, :, 0].any(), "head 0 belongs to another writer"
    # per layer: side waits for compute, one record on the side stream, the inputs kept alive for it,
    # and the copy thread reads the block only after synchronizing on that very event
    log = fake_streams.log
    records = [entry[2] for entry in log if entry[0] == "record"]
    assert len(records) == DIMS.num_layers and all(entry[1] == "side" for entry in log if entry[0] == "record")
    assert [entry for entry in log if entry[0] == "wait_stream"] == [("wait_stream", "side", "compute")] * 3
    assert [entry[1] for entry in log if entry[0] == "synchronize"] == records
    assert sum(entry[0] == "keep" for entry in log) == 2 * DIMS.num_layers
    # the copy thread made the rank's device its own before its first copy (a new thread starts on device 0)
    first_of_thread = next(entry for entry in log if entry[0] in ("bind", "synchronize"))
    assert first_of_thread[0] == "bind" and first_of_thread[1].startswith("seesaw-kv")


def _swap_in(area: HostKV, streams=None) -> tuple[DeviceKVCache, object]:
    """Swap both sequences' KV heads 1..3 into a cache of those 3 heads: sequence 1 read from the area,
    sequence 2 from a received block (as a piece from another node arrives)."""
    staged = [StagedSeq(seq_id=1, extents=[(0, 7)], num_tokens=7, writer="prefill", writer_replica=0),
              StagedSeq(seq_id=2, extents=[(20, 5), (40, 4)], num_tokens=9, writer="prefill", writer_replica=0)]
    piece = SimpleNamespace(layers=range(0, DIMS.num_layers), kv_heads=range(1, 4))
    cache = _cache(3, streams)
    for seq in staged:
        cache.allocator.ensure(seq.seq_id, seq.num_tokens)
    block = backend.host_empty((DIMS.num_layers, 2, 3, 9, DIMS.head_dim), torch.float32)
    area._gather(block, piece.layers, piece.kv_heads, staged[1].extents, 9)
    swap = area.swap_in_pieces(cache, [(staged[0], piece)], [(staged[1], piece, block)], range(1, 4))
    return cache, swap


@pytest.mark.parametrize("mapped", [False, True], ids=["bounce", "mapped"])
def test_swap_in_same_cache_on_both_paths_with_per_layer_events(mapped):
    cpu, fake_streams = _area(backend.Streams(torch.device("cpu"))), FakeStreams()
    fake = _area(fake_streams, mapped)
    _fill(cpu)
    _fill(fake)
    expected, swap = _swap_in(cpu)
    swap.finish()
    fake_streams.log.clear()
    got, swap = _swap_in(fake, fake_streams)
    for layer in range(DIMS.num_layers):
        swap.wait(layer)
        swap.wait(layer)  # a second micro-batch: the compute stream already waits, nothing more to do
    swap.finish()
    assert torch.equal(expected.keys, got.keys) and torch.equal(expected.values, got.values)
    keys, values = _prefill_kv(1, 16)
    k, v = got.read_sequence(1, 2, 9)
    assert torch.equal(k, keys[1:4, 7:16]) and torch.equal(v, values[1:4, 7:16])
    # the bytes reported are the KV that arrived: both sequences' K and V, every layer (9,216 bytes here)
    arrived = sum(tensor.nbytes for layer in range(DIMS.num_layers) for seq_id, length in ((1, 7), (2, 9))
                  for tensor in got.read_sequence(layer, seq_id, length))
    assert swap.nbytes == arrived == 9_216
    # the protocol: side after compute first; per layer, both sequences' writes queued on the side stream,
    # then one event; the compute stream waits for each layer's own event exactly once
    log = [entry for entry in fake_streams.log if entry[0] != "synchronize"]
    assert log[0] == ("wait_stream", "side", "compute")
    writes = [entry for entry in log if entry[0] == "write_heads"]
    assert writes == [("write_heads", layer, "side") for layer in range(DIMS.num_layers) for _ in range(2)]
    copy_thread = [entry for entry in log if entry[0] != "wait"]  # the compute thread's waits interleave
    events = {}
    for index, entry in enumerate(copy_thread):
        if entry[0] == "record":
            layer = copy_thread[index - 1][1]
            assert copy_thread[index - 1][0] == "write_heads" and entry[1] == "side"
            events[layer] = entry[2]
    waits = [entry for entry in log if entry[0] == "wait"]
    assert waits == [("wait", "compute", events[layer]) for layer in range(DIMS.num_layers)]
    for layer in range(DIMS.num_layers):  # a layer's event is waited for only after it was recorded
        assert log.index(("record", "side", events[layer])) < log.index(("wait", "compute", events[layer]))


def test_layer_ready_blocks_the_host_only_until_the_layer_is_queued():
    streams = FakeStreams()
    ready = LayerReady(range(4), streams, streams.compute)
    gates = [threading.Event() for _ in range(4)]

    def copy_thread():
        for layer in range(4):
            gates[layer].wait()
            ready.publish(layer, ("event", layer))
        ready.release_all()

    thread = threading.Thread(target=copy_thread)
    thread.start()
    gates[0].set()
    ready.wait(0)
    assert streams.log == [("wait", "compute", ("event", 0))]
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (ready.wait(2), returned.set()))
    waiter.start()
    gates[1].set()
    time.sleep(0.05)
    assert not returned.is_set(), "layer 2 is not queued yet"
    gates[2].set()
    assert returned.wait(5)
    gates[3].set()
    thread.join(5)
    waiter.join(5)
    ready.wait_all()
    assert [entry[2] for entry in streams.log] == [("event", 0), ("event", 2), ("event", 1), ("event", 3)]
    assert ready.waited > 0


def test_layer_ready_never_hangs_when_the_copy_thread_fails():
    streams = FakeStreams()
    ready = LayerReady(range(3), streams, streams.compute)
    ready.publish(0, ("event", 0))
    ready.release_all()  # the copy thread's finally after an error in layer 1
    ready.wait_all()
    assert streams.log == [("wait", "compute", ("event", 0))]


def test_eviction_on_the_device_path_is_queued_until_finish_writes():
    fake_streams = FakeStreams()
    area = _area(fake_streams)
    staged = StagedSeq(seq_id=5, extents=[(10, 3), (30, 3)], num_tokens=6, writer="decode", writer_replica=0)
    keys = torch.arange(2 * 6 * DIMS.head_dim, dtype=torch.float32).view(2, 6, DIMS.head_dim)
    area.write_sequence(1, staged, keys, keys + 1, range(2, 4))
    area.finish_writes()
    assert torch.equal(area.kv[1, 0, 2:4, 10:13], keys[:, 0:3]) and torch.equal(area.kv[1, 1, 2:4, 30:33], keys[:, 3:6] + 1)
    assert [entry[0] for entry in fake_streams.log][:2] == ["wait_stream", "record"]
    assert area.stats.swap_out_bytes == 2 * keys.numel() * 4


@pytest.mark.parametrize("device_path", [False, True])
def test_remote_blocks_are_host_buffers(device_path):
    """What crosses nodes is allocated by backend.host_empty: marked as host memory (pinned on an
    accelerator), so the transfer check routes it through host groups."""
    block = backend.host_empty((2, 3), torch.float32)
    assert getattr(block, backend.HOST_TAG, False)
    assert block.is_pinned() == (backend.accelerator_name() != "cpu")


def test_swap_in_of_a_sequence_sharing_a_resident_prefix_copies_only_the_rest_on_both_paths():
    """Sequence 2's staged KV starts with the same 4 tokens as sequence 1's (a shared prefix, one block of 4):
    swapped in after sequence 1, its table starts with sequence 1's block and only its other tokens move."""
    for streams in (None, FakeStreams()):
        area = _area(backend.Streams(torch.device("cpu")) if streams is None else streams)
        _fill(area)
        area.kv[:, :, :, 40:44] = area.kv[:, :, :, 0:4]  # sequence 2's first extent holds the same prefix
        piece = SimpleNamespace(layers=range(0, DIMS.num_layers), kv_heads=range(1, 4))
        first = StagedSeq(seq_id=1, extents=[(0, 7)], num_tokens=7, writer="prefill", writer_replica=0,
                          shared=("sys", 4))
        second = StagedSeq(seq_id=2, extents=[(40, 4), (20, 5)], num_tokens=9, writer="prefill", writer_replica=0,
                           shared=("sys", 4))
        cache = _cache(3, streams)
        present = {}
        for seq in (first, second):
            present[seq.seq_id] = cache.allocator.ensure_shared(seq.seq_id, seq.num_tokens, *seq.shared)
        assert present == {1: 0, 2: 4} and cache.allocator.tables[2][0] == cache.allocator.tables[1][0]
        swap = area.swap_in_pieces(cache, [(first, piece), (second, piece)], [], range(1, 4), present)
        swap.finish()
        # what arrived: the KV both sequences now hold, less sequence 2's 4 prefix tokens it shares with 1
        held = sum(tensor.nbytes for layer in range(DIMS.num_layers) for seq in (first, second)
                   for tensor in cache.read_sequence(layer, seq.seq_id, seq.num_tokens))
        shared = sum(tensor.nbytes for layer in range(DIMS.num_layers) for tensor in cache.read_sequence(layer, 2, 4))
        assert swap.nbytes == held - shared == 6_912
        for layer in range(DIMS.num_layers):
            for seq in (first, second):
                expected = area._load(range(layer, layer + 1), range(1, 4), seq.extents, seq.num_tokens)[0]
                keys, values = cache.read_sequence(layer, seq.seq_id, seq.num_tokens)
                assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])


def test_the_copy_thread_runs_its_copies_alone_and_leaves_the_forwards_threads():
    """The staging copy thread computes on one thread (a team of its own made libgomp cut every team's
    spin-wait short: a 2-core rank's decode step 41 against 26-28 ms); the caller keeps its thread count, and a
    large copy on the copy thread starts no OpenMP worker."""
    import os

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        area = _area(backend.Streams(torch.device("cpu")))
        assert area._worker.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
        big = torch.randn(4_000_000)
        threads = len(os.listdir("/proc/self/task"))
        area._worker.submit(lambda: torch.empty_like(big).copy_(big)).result()
        assert len(os.listdir("/proc/self/task")) == threads
    finally:
        torch.set_num_threads(previous)


def test_a_mapping_is_kept_only_where_both_sides_see_each_others_writes():
    from seesaw_ds.kv.staging import checked_mapping

    kv = torch.zeros(DIMS.num_layers, 2, DIMS.num_kv_heads, CAPACITY, DIMS.head_dim, dtype=torch.bfloat16)
    assert checked_mapping(kv, kv, slot=3) is kv                      # the same bytes: kept
    assert checked_mapping(kv, kv.clone(), slot=CAPACITY + 5) is None  # another copy: not a view of the area
    assert checked_mapping(kv, None, slot=0) is None


class _KernelsOnlyView(torch.Tensor):
    """A stand-in for a mapped view whose kernels reach the host memory but whose memory copies do not:
    ``copy_`` touching it (a cudaMemcpyAsync on the mapped address, on a GPU) raises or leaves it unchanged."""

    raises = True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            if cls.raises:
                raise RuntimeError("CUDA error: invalid argument")
            return args[0]
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("raises", [True, False], ids=["copy-raises", "copy-dropped"])
def test_a_mapping_whose_memory_copies_fail_is_refused(monkeypatch, raises):
    """Swaps of a rank with one KV head copy contiguous pieces between the mapped area and the device
    (copy_, a memory copy): the check tries that too, not only kernels reading and writing the area."""
    from seesaw_ds.kv.staging import checked_mapping

    monkeypatch.setattr(_KernelsOnlyView, "raises", raises)
    kv = torch.zeros(DIMS.num_layers, 2, DIMS.num_kv_heads, CAPACITY, DIMS.head_dim, dtype=torch.bfloat16)
    blind = kv.as_subclass(_KernelsOnlyView)
    assert blind.data_ptr() == kv.data_ptr()
    blind[0, 0, 0, 3].fill_(2)                                        # its kernels do reach the area
    assert bool((kv[0, 0, 0, 3] == 2).all())
    assert checked_mapping(kv, blind, slot=3) is None


def test_no_mapped_view_off_cuda():
    assert backend.mapped_view(torch.zeros(4), torch.device("cpu")) is None


def test_a_staging_area_closed_twice_frees_its_communicator_once():
    """close() frees the area's node communicator (real MPI leaves MPI_COMM_NULL behind, on which a second
    Barrier fails): a second close() does nothing."""
    from mpi4py import MPI

    from seesaw_ds.kv.staging import StagingArea

    env = SimpleNamespace(node=MPI.COMM_SELF, rank=0)
    topology = SimpleNamespace(env=env, instance_index=0, instance_rank=0)
    dims = ModelDims(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, intermediate_size=64,
                     vocab_size=100)
    area = StagingArea(topology, dims, torch.float32, capacity_tokens=16)
    assert area.kv.shape == (2, 2, 2, 16, 8)
    area.close()
    assert area.kv is None and area._comm == MPI.COMM_NULL
    area.close()
