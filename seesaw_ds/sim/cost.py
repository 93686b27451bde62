"""Analytical cost of forward passes, layout switches and KV swaps on one GPU type (pure numpy).

Starting point: appendix A of the Seesaw paper (a roofline per layer plus the TP all-reduce). What is
refined, and why, is in ``docs/planner.md``. Units are explicit everywhere: bytes, seconds, FLOP, FLOP/s,
tokens. The time functions take numpy arrays (one entry per engine step), so a whole run is timed in one
call, and describe work with four numbers per micro-batch or step:

- ``tokens``: query tokens through the linear layers (prompt tokens in prefill, one per sequence in decode);
- ``pairs``: (query, key) pairs attention computes, i.e. sum over tokens of the keys each one attends to
  (causal prefill of n fresh tokens: n(n+1)/2; decode over c cached tokens: c+1);
- ``kv_read``: KV tokens read from the cache (decode: the context; prefill: a chunk's cached prefix);
- ``samples``: sequences whose last position goes through the LM head (they sample a token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seesaw_ds.distributed.layout import Layout, ModelDims, layer_range

GIB = float(2 ** 30)


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One GPU type and the links around it."""

    name: str
    memory_bytes: float
    """Device memory (bytes)."""
    hbm_bandwidth: float
    """Device memory bandwidth (bytes/s)."""
    peak_flops: float
    """Dense fp16/bf16 tensor-core peak (FLOP/s)."""
    interconnect: str
    """`pcie` or `nvlink`: what TP all-reduces and PP sends travel over."""
    link_bandwidth: float
    """GPU-to-GPU bandwidth per GPU (bytes/s) used by ring all-reduce and point-to-point."""
    link_latency: float
    """Latency of one ring step or one point-to-point message (s)."""
    host_bandwidth: float
    """Host-to-device (and back) bandwidth per GPU (bytes/s): weight reloads and KV swaps."""

    def scaled(self, link_scale: float) -> "GpuSpec":
        """The same GPU with `link_scale` times the GPU-to-GPU bandwidth (the interconnect sweep)."""
        fields = dict(self.__dict__, link_bandwidth=self.link_bandwidth * link_scale)
        return GpuSpec(**fields)


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    """Fractions of the peak figures that real kernels reach; fixed a priori, never fitted to results."""

    flops: float = 0.7
    """Large fp16 GEMMs and flash attention: ~70% of dense peak."""
    hbm: float = 0.8
    """Streaming weights or KV: ~80% of the HBM figure."""
    link: float = 0.8
    """NCCL bus bandwidth: ~80% of the link figure."""
    host: float = 0.8
    """Pinned host-to-device copies: ~80% of the PCIe figure."""

    def __post_init__(self) -> None:
        for name in ("flops", "hbm", "link", "host"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"efficiency.{name}={value} must lie in (0, 1]")


@dataclass(frozen=True)
class MemoryPlan:
    """How one GPU's memory splits under a layout (the fullest GPU of the layout)."""

    weight_bytes: float
    workspace_bytes: float
    kv_bytes: float
    kv_bytes_per_token: float
    """KV bytes one token costs on this GPU (its layers, its KV heads)."""
    kv_tokens: int
    """KV tokens this GPU (hence its data-parallel replica) holds; 0 when the weights do not fit."""


class CostModel:
    """Times and memory of a model of ``dims`` on ``gpu`` (fp16/bf16 weights and KV by default)."""

    def __init__(self, gpu: GpuSpec, dims: ModelDims, efficiency: Efficiency = Efficiency(), *,
                 dtype_bytes: int = 2, memory_utilization: float = 0.9, step_overhead: float = 0.0) -> None:
        if not 0.0 < memory_utilization <= 1.0:
            raise ValueError(f"memory_utilization={memory_utilization} must lie in (0, 1]")
        if step_overhead < 0:
            raise ValueError(f"step_overhead={step_overhead} s must be >= 0")
        self.gpu = gpu
        self.dims = dims
        self.eff = efficiency
        self.dtype_bytes = dtype_bytes
        self.memory_utilization = memory_utilization
        self.step_overhead = step_overhead  # seconds per engine step outside GPU kernels (CPU scheduling etc.)

    # -- shapes -------------------------------------------------------------------------------------------
    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads a TP rank holds; heads are replicated when tp exceeds them."""
        return max(1, self.dims.num_kv_heads // tp)

    def layer_params(self, tp: int) -> float:
        """Parameters of one decoder layer on one TP rank (q, k, v, o, gate, up, down, two norms)."""
        d = self.dims
        q_out = d.num_heads // tp * d.head_dim
        kv_out = self.kv_heads_per_gpu(tp) * d.head_dim
        attention = d.hidden_size * (q_out + 2 * kv_out) + q_out * d.hidden_size
        mlp = 3 * d.hidden_size * d.intermediate_size / tp
        return attention + mlp + 2 * d.hidden_size

    def vocab_params(self, tp: int) -> float:
        """Parameters of the embedding or of the LM head on one TP rank (vocab-parallel)."""
        return self.dims.vocab_size * self.dims.hidden_size / tp

    def stages(self, pp: int) -> list[tuple[int, bool, bool]]:
        """(layers, holds embedding, holds LM head) of every pipeline stage."""
        return [(len(layer_range(self.dims.num_layers, pp, i)), i == 0, i == pp - 1) for i in range(pp)]

    def _stage_params(self, layout: Layout, stage: tuple[int, bool, bool]) -> float:
        layers, embed, head = stage
        return (layers * self.layer_params(layout.tp) + (embed + head) * self.vocab_params(layout.tp)
                + head * self.dims.hidden_size)

    def weight_bytes_per_gpu(self, layout: Layout) -> float:
        """Weight bytes on the fullest GPU of ``layout`` (also what a switch to it loads per GPU)."""
        return max(self._stage_params(layout, s) for s in self.stages(layout.pp)) * self.dtype_bytes

    def model_bytes(self) -> float:
        """Weight bytes of the whole model."""
        return self._stage_params(Layout(), (self.dims.num_layers, True, True)) * self.dtype_bytes

    def kv_bytes_per_token(self, layout: Layout | None = None) -> float:
        """KV bytes of one token: on the fullest GPU of ``layout``, or of the whole model when None."""
        d = self.dims
        if layout is None:
            return 2 * self.dtype_bytes * d.num_layers * d.num_kv_heads * d.head_dim
        layers = max(s[0] for s in self.stages(layout.pp))
        return 2 * self.dtype_bytes * layers * self.kv_heads_per_gpu(layout.tp) * d.head_dim

    # -- memory -------------------------------------------------------------------------------------------
    def workspace_bytes(self, layout: Layout, tokens: int, samples: int = 256) -> float:
        """Peak activation memory of a forward pass of ``tokens`` tokens (one layer live at a time) plus
        fp32 logits of ``samples`` sequences."""
        d, tp = self.dims, layout.tp
        per_token = (3 * d.hidden_size + (d.num_heads + 2 * self.kv_heads_per_gpu(tp) * tp) * d.head_dim / tp
                     + 2 * d.intermediate_size / tp)
        return tokens * per_token * self.dtype_bytes + samples * d.vocab_size / tp * 4

    def memory(self, decode: Layout, *, also: Layout | None = None, workspace_tokens: int = 4096) -> MemoryPlan:
        """Memory of one GPU running ``decode`` (its KV layout); ``also`` is a second layout the same GPUs
        switch to (Seesaw's prefill layout): weights and workspace are sized for the larger of the two,
        since the device-tier KV cache stays allocated through both phases."""
        layouts = [decode] if also is None else [decode, also]
        weights = max(self.weight_bytes_per_gpu(x) for x in layouts)
        workspace = max(self.workspace_bytes(x, workspace_tokens) for x in layouts)
        per_token = self.kv_bytes_per_token(decode)
        kv = self.gpu.memory_bytes * self.memory_utilization - weights - workspace
        tokens = int(kv // per_token) if kv > 0 else 0
        return MemoryPlan(weights, workspace, max(kv, 0.0), per_token, tokens)

    # -- communication ------------------------------------------------------------------------------------
    def _link(self) -> float:
        return self.gpu.link_bandwidth * self.eff.link

    def allreduce_time(self, nbytes, ranks: int):
        """Ring all-reduce of ``nbytes`` over ``ranks`` GPUs: 2(n-1)/n * bytes / bandwidth + 2(n-1) steps of
        latency (reduce-scatter then all-gather)."""
        if ranks <= 1:
            return np.zeros_like(np.asarray(nbytes, dtype=float))
        steps = 2 * (ranks - 1)
        return steps / ranks * np.asarray(nbytes, dtype=float) / self._link() + steps * self.gpu.link_latency

    def allgather_time(self, nbytes, ranks: int):
        """Ring all-gather of a result of ``nbytes`` in total over ``ranks`` GPUs."""
        if ranks <= 1:
            return np.zeros_like(np.asarray(nbytes, dtype=float))
        steps = ranks - 1
        return steps / ranks * np.asarray(nbytes, dtype=float) / self._link() + steps * self.gpu.link_latency

    def p2p_time(self, nbytes):
        """One point-to-point message (a pipeline stage handing its activations on)."""
        return np.asarray(nbytes, dtype=float) / self._link() + self.gpu.link_latency

    # -- compute ------------------------------------------------------------------------------------------
    def _roofline(self, nbytes, flops):
        return np.maximum(nbytes / (self.gpu.hbm_bandwidth * self.eff.hbm), flops / (self.gpu.peak_flops * self.eff.flops))

    def layer_time(self, layout: Layout, tokens, pairs, kv_read):
        """(compute, communication) seconds of one decoder layer on one GPU for one micro-batch.

        Linear layers: max(weight + activation bytes / HBM, 2 * params * tokens / FLOP/s). Attention:
        max(Q, K, V, O and cached-KV bytes / HBM, 4 * head_dim * heads * pairs / FLOP/s) -- QK^T and PV
        each cost 2 FLOP per (query, key) pair per head dimension (the paper's d^2 is a typo for d).
        Communication: two ring all-reduces of the hidden states (after o_proj and after down_proj).
        """
        d, tp, b = self.dims, layout.tp, self.dtype_bytes
        tokens, pairs, kv_read = (np.asarray(x, dtype=float) for x in (tokens, pairs, kv_read))
        params = self.layer_params(tp)
        q_dim = d.num_heads // tp * d.head_dim
        kv_dim = self.kv_heads_per_gpu(tp) * d.head_dim
        activations = tokens * b * (4 * d.hidden_size + 2 * q_dim + 2 * kv_dim + 3 * d.intermediate_size / tp)
        linear = self._roofline(params * b + activations, 2 * params * tokens)
        attn_bytes = b * (tokens * (2 * q_dim + 2 * kv_dim) + kv_read * 2 * kv_dim)
        attention = np.where(tokens > 0, self._roofline(attn_bytes, 4 * q_dim * pairs), 0.0)
        comm = np.where(tokens > 0, 2 * self.allreduce_time(tokens * d.hidden_size * b, tp), 0.0)
        return linear + attention, comm

    def stage_time(self, layout: Layout, tokens, pairs, kv_read, samples):
        """(compute, communication) seconds of the slowest pipeline stage for one micro-batch.

        The first stage adds the vocab-parallel embedding's all-reduce, the last the LM head on ``samples``
        rows and the all-gather of their logits; every stage but the last sends its activations on.
        """
        d, tp, b = self.dims, layout.tp, self.dtype_bytes
        tokens, pairs, kv_read, samples = (np.asarray(x, dtype=float) for x in (tokens, pairs, kv_read, samples))
        layer_compute, layer_comm = self.layer_time(layout, tokens, pairs, kv_read)
        active = tokens > 0
        best_total = best_compute = best_comm = None
        for layers, embed, head in {s for s in self.stages(layout.pp)}:
            compute = layers * layer_compute
            comm = layers * layer_comm
            if embed:
                comm = comm + np.where(active, self.allreduce_time(tokens * d.hidden_size * b, tp), 0.0)
            if head:
                vocab = self.vocab_params(tp)
                compute = compute + np.where(active, self._roofline(vocab * b, 2 * vocab * samples), 0.0)
                comm = comm + np.where(active, self.allgather_time(samples * d.vocab_size * b, tp), 0.0)
            else:
                comm = comm + np.where(active, self.p2p_time(tokens * d.hidden_size * b), 0.0)
            total = compute + comm
            if best_total is None:
                best_total, best_compute, best_comm = total, compute, comm
            else:
                slower = total > best_total
                best_total = np.where(slower, total, best_total)
                best_compute = np.where(slower, compute, best_compute)
                best_comm = np.where(slower, comm, best_comm)
        return best_compute, best_comm

    def step_time(self, layout: Layout, seqs, tokens, pairs, kv_read, samples, *, streaming: bool,
                  pipeline: str = "overlapped"):
        """(total, communication) seconds of one engine step of one data-parallel replica.

        The replica's ``seqs`` sequences are cut into m = min(pp, seqs) equal micro-batches.
        ``pipeline='overlapped'``: micro-batches of consecutive steps overlap (vLLM, the paper's system):
        a streaming step (prefill: nothing waits for its output) costs m stage times, its fill paid once per
        phase (see :meth:`fill_time`); a dependent step (decode: the next step needs these tokens) costs pp
        stage times, since each micro-batch must travel the whole pipeline before it can go again.
        ``pipeline='synchronous'``: every step fills and drains the pipeline, (m + pp - 1) stage times
        (today's seesaw_ds executor). Each step adds ``step_overhead`` once.
        """
        if pipeline not in ("overlapped", "synchronous"):
            raise ValueError(f"pipeline={pipeline!r} must be 'overlapped' or 'synchronous'")
        seqs = np.asarray(seqs, dtype=float)
        pp = layout.pp
        micro = np.clip(seqs, 1, pp)
        compute, comm = self.stage_time(layout, *(np.asarray(x, dtype=float) / micro
                                                  for x in (tokens, pairs, kv_read, samples)))
        if pipeline == "synchronous":
            factor = micro + pp - 1
        else:
            factor = micro if streaming else np.full_like(micro, pp)
        factor = np.where(seqs > 0, factor, 0.0)
        overhead = np.where(seqs > 0, self.step_overhead, 0.0)
        return factor * (compute + comm) + overhead, factor * comm

    def fill_time(self, layout: Layout, seqs, tokens, pairs, kv_read, samples) -> float:
        """Pipeline fill of a streaming phase (overlapped pipeline): pp - 1 stage times of its first step."""
        micro = max(1.0, min(float(seqs), layout.pp))
        compute, comm = self.stage_time(layout, *(np.asarray(float(x)) / micro for x in (tokens, pairs, kv_read,
                                                                                           samples)))
        return float((layout.pp - 1) * (compute + comm))

    # -- host transfers -----------------------------------------------------------------------------------
    def reshard_time(self, layout: Layout) -> float:
        """Seconds to switch to ``layout``: every GPU loads its new shard from pinned host memory at once,
        so the fullest GPU's shard over its host link decides."""
        return self.weight_bytes_per_gpu(layout) / (self.gpu.host_bandwidth * self.eff.host)

    def swap_time(self, kv_tokens, layout: Layout):
        """Seconds to move ``kv_tokens`` tokens of KV between host and one GPU of ``layout`` (its slice)."""
        return np.asarray(kv_tokens, dtype=float) * self.kv_bytes_per_token(layout) / (
            self.gpu.host_bandwidth * self.eff.host)
