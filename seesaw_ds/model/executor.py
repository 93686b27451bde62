"""Run a batch under the active layout, and switch layouts at run time.

Every rank of an instance calls the same methods with the same :class:`ForwardPlan` (SPMD). The executor
keeps one :class:`~seesaw_ds.model.stage.StageModel` per distinct layout, all built at start-up from the
one host copy, so ``activate`` only moves the new layout's shard onto the device (nothing on a CPU).
A forward pass splits this rank's replica's sequences into micro-batches, runs its pipeline stage on
each (hidden states travel point-to-point), and on the last stage returns the logits of each sequence's
last position.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.backends import routes
from seesaw_ds.distributed.groups import Topology
from seesaw_ds.distributed.layout import kv_head_range, layer_range
from seesaw_ds.kv import sizing
from seesaw_ds.kv.device import DeviceKVCache
from seesaw_ds.model import compiled, device_attention, graphs, kernels
from seesaw_ds.model.attention import DecodeMeta, PrefillMeta
from seesaw_ds.model.decode_step import DecodeBuffers, table_width
from seesaw_ds.model.families import ModelSpec
from seesaw_ds.model.loader import HostWeights
from seesaw_ds.model.stage import StageModel

log = logging.getLogger(__name__)

@dataclass
class SeqWork:
    """One sequence's share of a forward pass."""

    seq_id: int
    replica: int          # data-parallel replica of the active layout that runs it
    tokens: list[int]     # prefill: the prompt; decode: the last sampled token
    start: int = 0        # KV tokens already cached for this sequence
    staging_extents: list[tuple[int, int]] | None = None  # prefill into staging: the sequence's slots
    context_extents: list[tuple[int, int]] | None = None  # prefill over a cached prefix: its `start` tokens' slots
    prompt_logits: bool = False  # prefill: also return the logits at every prompt position (prompt logprobs)


@dataclass
class ForwardPlan:
    """What every rank of the instance runs in one step (sent by the instance leader)."""

    kind: str                             # "prefill" | "decode"
    seqs: list[SeqWork]
    sink: str = "device"                  # prefill K/V destination: "device" or "staging"
    free: list[int] = field(default_factory=list)  # sequences whose device blocks are released first


@dataclass
class SwitchStats:
    """What one layout switch cost."""

    layout: str
    bytes_moved: int
    shard_bytes: int
    seconds: float


def micro_batches(seqs: list[SeqWork], count: int, by_tokens: bool) -> list[list[SeqWork]]:
    """Split ``seqs`` into at most ``count`` contiguous micro-batches of balanced size (pure)."""
    if not seqs:
        return []
    count = max(1, min(count, len(seqs)))
    weights = [len(s.tokens) if by_tokens else 1 for s in seqs]
    total = sum(weights)
    batches, current, acc = [], [], 0
    for seq, weight in zip(seqs, weights):
        current.append(seq)
        acc += weight
        if len(batches) < count - 1 and acc >= total * (len(batches) + 1) / count:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches


class Executor:
    """This rank's model under every configured layout, one of them active."""

    def __init__(self, topology: Topology, host: HostWeights, template, spec: ModelSpec, *,
                 device_tokens: int | None, block_size: int = 16, device: torch.device | None = None, staging=None,
                 prefill_micro_batches: int = 8, device_memory_fraction: float | None = None,
                 device_tokens_cap: int | None = None, prepack: bool = True, compile: str | bool = False,
                 max_decode_seqs: int | None = None, max_model_len: int | None = None,
                 cuda_graphs: str | bool = "auto", graph_backend=None):
        self.topology = topology
        self.dims = dims = spec.dims
        self.device = device or backend.device()
        device_attention.configure(self.device)
        self.dtype = host.dtype
        self.block_size = block_size
        self.prefill_micro_batches = prefill_micro_batches
        self.staging = staging
        self.stages: dict[str, StageModel] = {}
        self.compiled = compiled.resolve(compile, self.device, self.dtype)
        """Whether the stages' decoder layers run under torch.compile (model.compile)."""
        by_layout: dict[object, StageModel] = {}
        for name, groups in topology.layouts.items():
            if groups.layout not in by_layout:
                by_layout[groups.layout] = StageModel(template, host, spec, groups, self.device, prepack=prepack,
                                                      fuse_siblings=not self.compiled)
            self.stages[name] = by_layout[groups.layout]
        if self.compiled:
            for stage in by_layout.values():
                stage.compile()
        if device_tokens is None:  # sized from memory, the same on every rank (collective)
            device_tokens = sizing.size_device_tier(
                topology, dims, self.dtype, self.device, block_size=block_size, fraction=device_memory_fraction,
                cap_tokens=device_tokens_cap, staging=staging,
                weight_bytes=max(stage.shard_bytes for stage in by_layout.values()))
        self.device_tokens = device_tokens
        """Device-tier tokens per data-parallel replica (what the scheduler plans with)."""
        self.device_blocks = max(1, device_tokens // block_size)
        self.max_decode_seqs = max_decode_seqs
        """Rows of the decode step buffers (scheduler.max_decode_seqs; None: sized by the first step, grown)."""
        self.max_model_len = max_model_len
        """Tokens a sequence may reach (model.max_model_len): the width of the step buffers' block table."""
        self._step_buffers: dict[int, DecodeBuffers] = {}  # per pipeline micro-batch: the decode step's inputs
        # model.cuda_graphs: the decode step's graphs (graph_backend: a stand-in, the CPU tests' ReplayFake)
        mode = graphs.resolve(cuda_graphs, self.device) if graph_backend is None else str(cuda_graphs).lower()
        self.graphs: graphs.DecodeGraphs | None = None
        if mode != "false":
            self.graphs = graphs.DecodeGraphs(mode, graphs.buckets(max_decode_seqs or DecodeBuffers.MIN_ROWS),
                                              graph_backend or graphs.CudaGraphs(self.device))
        self._graph_refusals: dict[int, str | None] = {}
        self.caches: dict[object, DeviceKVCache] = {}
        self.active: str | None = None
        self.switches: list[SwitchStats] = []

    # ---------------------------------------------------------------- layouts
    def activate(self, name: str) -> SwitchStats:
        """Make layout ``name`` the one forward passes run under."""
        start = time.perf_counter()
        stage = self.stages[name]
        moved = 0
        if self.active is None or self.stages[self.active] is not stage:
            if self.graphs is not None:
                self.graphs.drop()  # they read the weights about to move; their pool goes before the new weights come
            if self.active is not None:
                self.stages[self.active].to_host()
            moved = stage.to_device()
        backend.use_shm_allreduce(self.topology.layouts[name].shm_allreduce)
        self.active = name
        stats = SwitchStats(name, moved, stage.shard_bytes, time.perf_counter() - start)
        self.switches.append(stats)
        return stats

    @property
    def compile_seconds(self) -> float:
        """Seconds this rank spent compiling graphs so far, torch.compile's and CUDA graphs' captures (0 when
        eager)."""
        captured = self.graphs.capture_seconds if self.graphs is not None else 0.0
        return captured + sum(stage.compiled.compile_seconds for stage in set(self.stages.values()) if stage.compiled)

    @property
    def groups(self):
        return self.topology.layouts[self.active]

    def cache(self, name: str | None = None) -> DeviceKVCache:
        """The device-tier KV cache of a layout (allocated on first use, kept while the job runs)."""
        groups = self.topology.layouts[name or self.active]
        if groups.layout not in self.caches:
            layers = layer_range(self.dims.num_layers, groups.layout.pp, groups.pp_index)
            heads = kv_head_range(self.dims.num_kv_heads, groups.layout.tp, groups.tp_index)
            self.caches[groups.layout] = DeviceKVCache(layers, self.device_blocks, self.block_size, len(heads),
                                                       self.dims.head_dim, self.dtype, self.device)
            kernels.applies(self.caches[groups.layout].keys)  # build the decode kernel now, not in a timed step
        return self.caches[groups.layout]

    # ---------------------------------------------------------------- forward
    def forward(self, plan: ForwardPlan, ready=None, prompt_logits: dict | None = None, argmax_only: bool = False
                ) -> tuple[list[int], torch.Tensor | None]:
        """Run ``plan`` on this rank; the last stage returns (seq ids, last-position logits [N, vocab]), in float32,
        or with ``argmax_only`` in the model's dtype (the caller takes only each row's argmax: no float32 copy).

        ``prompt_logits``, when given, receives on the last stage ``{seq id: logits [len - 1, vocab]}`` at every
        prompt position but the last, for the prefill sequences whose ``SeqWork.prompt_logits`` is set.

        ``ready(layer)``, when given, is awaited before a decode step's attention reads ``layer`` (a swap-in
        still landing in the device tier).
        """
        groups = self.groups
        stage = self.stages[self.active]
        prefill = plan.kind == "prefill"
        cache = self.cache() if not prefill or plan.sink == "device" else None
        for seq_id in plan.free:
            cache.allocator.free(seq_id)
        mine = [s for s in plan.seqs if s.replica == groups.dp_index]
        pp = groups.layout.pp
        batches = micro_batches(mine, pp * self.prefill_micro_batches if prefill and pp > 1 else pp, by_tokens=prefill)
        pending_sends, seq_ids, logits = [], [], []
        with torch.inference_mode():
            rows = None if prefill or len(batches) != 1 else self._graph_rows(stage, len(batches[0]))
            for index, batch in enumerate(batches):
                if rows is not None:
                    hidden = self._decode_graphed(stage, batch, cache, ready, rows)
                else:
                    hidden = self._stage_forward(stage, batch, cache, ready, index, plan.sink, prefill)
                if groups.is_last_stage:
                    if prefill:
                        last = self._last_positions(batch)
                        logits.append(stage.head(hidden.reshape(-1, hidden.shape[-1])[last], not argmax_only))
                    else:  # [N, 1, hidden]: one position per sequence
                        logits.append(stage.head(hidden[:, -1], not argmax_only))
                    if prefill and (prompt_logits is not None or stage.head_gathers):  # every TP rank joins the gather
                        self._prompt_logits(stage, hidden.reshape(-1, hidden.shape[-1]), batch,
                                            prompt_logits if prompt_logits is not None else {})
                    seq_ids.extend(s.seq_id for s in batch)
                else:
                    pending_sends.append(backend.isend(hidden.contiguous(), groups.next_rank))
        for handle in pending_sends:
            handle.wait()
        if not groups.is_last_stage:
            return [], None
        if len(logits) > 1:
            return seq_ids, torch.cat(logits)
        return seq_ids, (logits[0] if logits else None)  # one micro-batch: no copy (256 x 49152 floats: 50 MB)

    def _stage_forward(self, stage: StageModel, batch: list[SeqWork], cache, ready, index: int, sink: str,
                       prefill: bool) -> torch.Tensor:
        """This stage's layers over a micro-batch, eagerly (hidden states in from the previous stage or the
        embedding); prefill ``[1, T, hidden]``, decode ``[N, 1, hidden]``."""
        groups = self.groups
        meta, token_ids, positions = (self._prefill_inputs(batch, cache, sink) if prefill
                                      else self._decode_inputs(batch, cache, ready, index))
        if groups.is_first_stage:
            hidden = stage.embed_tokens(token_ids)
        else:
            hidden = torch.empty((*token_ids.shape, self.dims.hidden_size), dtype=self.dtype, device=self.device)
            backend.recv(hidden, groups.prev_rank)
        segments = meta.cu_seqlens if prefill else list(range(len(batch) + 1))
        furthest = (max(s.start + len(s.tokens) for s in batch) if prefill else meta.max_length) - 1
        return stage.run_layers(hidden, positions, meta, segments, max_position=furthest)

    def _graph_rows(self, stage: StageModel, n: int) -> int | None:
        """The CUDA graph bucket a decode step of ``n`` sequences runs as, or None: eagerly."""
        if self.graphs is None:
            return None
        key = id(stage)
        if key not in self._graph_refusals:
            refusal = stage.graph_refusal()
            if refusal is None and stage.tp > 1 and not backend.device_groups_capturable():
                refusal = "its tensor-parallel all-reduce goes through host memory (ranks share a GPU)"
            self._graph_refusals[key] = refusal
            if refusal is not None and self.topology.env.rank == 0:
                (log.warning if self.graphs.mode == "true" else log.info)(
                    "seesaw_ds: decode steps under layout %s run without CUDA graphs: %s", self.active, refusal)
        return None if self._graph_refusals[key] else self.graphs.bucket(n)

    def _decode_graphed(self, stage: StageModel, batch: list[SeqWork], cache: DeviceKVCache, ready,
                        rows: int) -> torch.Tensor:
        """A decode step as the CUDA graph of bucket ``rows`` (seesaw_ds/model/graphs.py): the step buffers
        filled and padded to ``rows``, attention sized for the longest sequence the buffers hold, the swap-in
        (``ready``) landed first; returns the real rows' hidden states ``[N, 1, hidden]``."""
        meta, token_ids, positions = self._decode_inputs(batch, cache, None, rows=rows)
        if ready is not None:
            for layer in cache.layers:
                ready(layer)
        buffers = self.step_buffers(0)
        span = buffers.max_blocks * self.block_size  # positions and KV lengths any row of the buffers can have
        meta = replace(meta, max_length=span)
        segments = list(range(rows + 1))

        def body() -> torch.Tensor:
            return stage.run_layers(stage.embed_tokens(token_ids), positions, meta, segments, max_position=span - 1)

        generation = lambda: (id(stage), stage.placements, stage.rope.generation, buffers.reallocations)
        agree = lambda flags: routes.host_any(flags, stage.groups.tp_host_group)  # the group decides together
        return self.graphs.run(rows, body, generation, agree)[:len(batch)]

    @staticmethod
    def _prompt_logits(stage, flat_hidden: torch.Tensor, batch: list[SeqWork], out: dict) -> None:
        start = 0
        for s in batch:
            if s.prompt_logits and len(s.tokens) > 1:
                out[s.seq_id] = stage.head(flat_hidden[start:start + len(s.tokens) - 1])
            start += len(s.tokens)

    def _last_positions(self, batch: list[SeqWork]) -> torch.Tensor:
        """Each prefill sequence's last position in the packed row."""
        ends = torch.tensor([len(s.tokens) for s in batch]).cumsum(0) - 1
        return ends.to(self.device)

    def _prefill_inputs(self, batch: list[SeqWork], cache: DeviceKVCache, sink: str):
        tokens = [t for s in batch for t in s.tokens]
        positions = [s.start + i for s in batch for i in range(len(s.tokens))]
        bounds = [0]
        for s in batch:
            bounds.append(bounds[-1] + len(s.tokens))
        if sink == "device":
            for s in batch:
                cache.allocator.ensure(s.seq_id, s.start + len(s.tokens))

            def write(layer, keys, values):
                for s, lo, hi in zip(batch, bounds[:-1], bounds[1:]):
                    cache.write_sequence(layer, s.seq_id, s.start, keys[:, lo:hi], values[:, lo:hi])
        else:
            write = self.staging.prefill_sink(batch, bounds, self.groups)
        contexts = None
        if any(s.context_extents for s in batch):
            contexts = [self._staged_context(s) if s.context_extents else None for s in batch]
        meta = PrefillMeta(cu_seqlens=bounds, sink=write, contexts=contexts)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)[None, :]
        return meta, as_tensor(tokens), as_tensor(positions)

    def _staged_context(self, work: SeqWork):
        """A cached prompt prefix as attention context, per layer: this rank's KV heads of the prefix's
        staged extents (written by this replica under this layout, on this node: kv.plan.reads_own_writes)."""
        groups = self.groups
        heads = kv_head_range(self.dims.num_kv_heads, groups.layout.tp, groups.tp_index)

        def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.staging.read(layer, heads, work.context_extents, work.start)
            return keys.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True)
        return read

    def _decode_inputs(self, batch: list[SeqWork], cache: DeviceKVCache, ready, micro_batch: int = 0,
                       rows: int | None = None):
        """A decode micro-batch's inputs: written into the persistent step buffers (one copy to the device),
        the metadata and the token ids and positions ``[N, 1]`` as views of them (``rows``: padded to a CUDA
        graph's bucket, the padding on the cache's scratch block)."""
        ensure, tables = cache.allocator.ensure, cache.allocator.tables
        for s in batch:
            ensure(s.seq_id, s.start + 1)
        step = self.step_buffers(micro_batch).fill([s.tokens[-1] for s in batch], [s.start for s in batch],
                                                   [tables[s.seq_id] for s in batch], rows=rows,
                                                   pad_block=cache.scratch_block)
        return DecodeMeta.of(cache, step, ready), step.token_ids[:, None], step.positions[:, None]

    def step_buffers(self, micro_batch: int = 0) -> DecodeBuffers:
        """The persistent decode-step buffers of a pipeline micro-batch (allocated on first use, then kept)."""
        if micro_batch not in self._step_buffers:
            rows = self.max_decode_seqs or DecodeBuffers.MIN_ROWS
            width = table_width(self.max_model_len, self.block_size, self.device_blocks) or DecodeBuffers.MIN_BLOCKS
            self._step_buffers[micro_batch] = DecodeBuffers(self.device, self.block_size, rows, width,
                                                            backend.Streams(self.device))
        return self._step_buffers[micro_batch]

    def evict(self, staged_seqs, layout_name: str) -> None:
        """Swap running sequences of this rank's replica out of the device tier into the staging area."""
        from seesaw_ds.kv.plan import kv_writes

        groups = self.topology.layouts[layout_name]
        cache = self.cache(layout_name)
        share = kv_writes(groups.layout, self.dims, self.topology.instance_rank)
        local_heads = kv_head_range(self.dims.num_kv_heads, groups.layout.tp, groups.tp_index)
        for staged in staged_seqs:
            if staged.writer_replica != groups.dp_index:
                continue
            if share is not None:
                layers, heads = share
                lo, hi = heads.start - local_heads.start, heads.stop - local_heads.start
                for layer in layers:
                    keys, values = cache.read_sequence(layer, staged.seq_id, staged.num_tokens)
                    self.staging.write_sequence(layer, staged, keys[lo:hi], values[lo:hi], heads)
            cache.allocator.free(staged.seq_id)
        self.staging.finish_writes()  # on an accelerator the copies were queued: done before blocks are reused
