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


@dataclass(kw_only=True, unsafe_hash=True)
class Efficiency:
    """Fractions of the peak figures that real kernels reach; fixed a priori, never fitted to results. Also the
    schema of ``planner.efficiency`` (conf/planner/config.yaml): not frozen, so Hydra can override a field;
    hashable by value, as the frozen planner options that hold it need (nothing mutates one)."""

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


@dataclass(frozen=True, kw_only=True)
class ComputeProfile:
    """Measured compute seconds of the engine on one rank (``seesaw_ds/sim/profile.py`` times them): each
    part is affine in the work of one micro-batch. It replaces the roofline where the roofline is far from
    what the engine reaches (a CPU: small bf16 matrices, one kernel call per sequence, Python frames per
    layer). Coefficients are seconds per unit; a TP rank does 1/tp of the per-unit work, not of the fixed."""

    prefill_layer_s: float
    """Fixed seconds of one decoder layer in a prefill micro-batch (Python frames, kernel launches)."""
    prefill_token_s: float
    """Seconds per prompt token per layer (the linears, norms, rotary, activation)."""
    prefill_pair_s: float
    """Seconds per causal (query, key) pair per layer (attention's arithmetic)."""
    prefill_seq_s: float
    """Seconds per sequence per layer (one attention call per prompt, the K/V write)."""
    decode_layer_s: float
    """Fixed seconds of one decoder layer in a decode micro-batch."""
    decode_seq_s: float
    """Seconds per sequence per layer (its token through the linears, its cache write)."""
    decode_kv_token_s: float
    """Seconds per cached token read per layer (decode attention)."""
    head_s: float
    """Fixed seconds of the final norm, ``lm_head`` and sampling of a micro-batch (last stage)."""
    head_seq_s: float
    """Seconds per sampled sequence (its logits row and sampling)."""
    step_s: float
    """Fixed seconds of the rest of a micro-batch's forward (inputs, metadata, embedding)."""
    step_token_s: float
    """Seconds per token of the rest."""
    step_seq_s: float
    """Seconds per sequence of the rest."""
    threads: int = 1
    """Threads the timed rank used (a job's rank gets cores / ranks per node)."""
    dtype: str = "bfloat16"
    """The dtype weights and KV were timed in."""
    engine: str = ""
    """Fingerprint of the engine code that was timed."""
    seconds: float = 0.0
    """Time the measurement took."""

    def __post_init__(self) -> None:
        for name, value in self.to_json().items():
            if isinstance(value, float) and name != "seconds" and not value >= 0.0:
                raise ValueError(f"ComputeProfile.{name}={value} must be >= 0 seconds")

    def layer_time(self, prefill, tokens, pairs, kv_read, seqs, tp: int = 1):
        """Seconds of one decoder layer for one micro-batch (arrays broadcast; ``prefill`` is a bool or a
        bool array)."""
        prefill = np.asarray(prefill, dtype=bool)
        prefill_s = self.prefill_layer_s + (self.prefill_token_s * tokens + self.prefill_pair_s * pairs
                                            + self.prefill_seq_s * seqs) / tp
        decode_s = self.decode_layer_s + (self.decode_seq_s * seqs + self.decode_kv_token_s * kv_read) / tp
        return np.where(prefill, prefill_s, decode_s)

    def head_time(self, samples):
        """Seconds of the head and sampling for ``samples`` sequences (the head is replicated under TP)."""
        return self.head_s + self.head_seq_s * np.asarray(samples, dtype=float)

    def rest_time(self, tokens, seqs):
        """Seconds of the rest of a micro-batch's forward on one stage."""
        return self.step_s + self.step_token_s * np.asarray(tokens, dtype=float) + self.step_seq_s * np.asarray(
            seqs, dtype=float)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> "ComputeProfile":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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
    """Times and memory of a model of ``dims`` on ``gpu`` (fp16/bf16 weights and KV by default).

    Compute is priced by a roofline of ``gpu``'s figures, or, when ``profile`` is given, by the engine's
    measured per-layer, head and per-step costs (:class:`ComputeProfile`); communication, weight loads and
    KV swaps always by the links. ``prefill_micro_batches``: micro-batches per pipeline stage in a prefill
    step when pp > 1 (seesaw_ds's ``parallel.prefill_micro_batches``; 1 = the paper's pp micro-batches).
    """

    def __init__(self, gpu: GpuSpec, dims: ModelDims, efficiency: Efficiency = Efficiency(), *,
                 dtype_bytes: int = 2, memory_utilization: float = 0.9, step_overhead: float = 0.0,
                 profile: ComputeProfile | None = None, prefill_micro_batches: int = 1) -> None:
        if not 0.0 < memory_utilization <= 1.0:
            raise ValueError(f"memory_utilization={memory_utilization} must lie in (0, 1]")
        if step_overhead < 0:
            raise ValueError(f"step_overhead={step_overhead} s must be >= 0")
        if prefill_micro_batches < 1:
            raise ValueError(f"prefill_micro_batches={prefill_micro_batches} must be >= 1")
        self.profile = profile
        self.prefill_micro_batches = prefill_micro_batches
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

    def layer_time(self, layout: Layout, tokens, pairs, kv_read, *, seqs=None, prefill=None):
        """(compute, communication) seconds of one decoder layer on one GPU for one micro-batch.

        With a :class:`ComputeProfile`, compute is its measured layer time (``seqs`` and ``prefill`` say
        how many sequences the micro-batch holds and which phase it is; by default, one per token and
        prefill where a token attends to more than one key on average). Otherwise a roofline:

        linear layers: max(weight + activation bytes / HBM, 2 * params * tokens / FLOP/s). Attention:
        max(Q, K, V, O and cached-KV bytes / HBM, 4 * head_dim * heads * pairs / FLOP/s) -- QK^T and PV
        each cost 2 FLOP per (query, key) pair per head dimension (the paper's d^2 is a typo for d).
        Communication: two ring all-reduces of the hidden states (after o_proj and after down_proj).
        """
        d, tp, b = self.dims, layout.tp, self.dtype_bytes
        tokens, pairs, kv_read = (np.asarray(x, dtype=float) for x in (tokens, pairs, kv_read))
        comm = np.where(tokens > 0, 2 * self.allreduce_time(tokens * d.hidden_size * b, tp), 0.0)
        if self.profile is not None:
            seqs = tokens if seqs is None else np.asarray(seqs, dtype=float)
            prefill = (kv_read == 0) & (pairs > tokens) if prefill is None else prefill
            compute = self.profile.layer_time(prefill, tokens, pairs, kv_read, seqs, tp)
            return np.where(tokens > 0, compute, 0.0), comm
        params = self.layer_params(tp)
        q_dim = d.num_heads // tp * d.head_dim
        kv_dim = self.kv_heads_per_gpu(tp) * d.head_dim
        activations = tokens * b * (4 * d.hidden_size + 2 * q_dim + 2 * kv_dim + 3 * d.intermediate_size / tp)
        linear = self._roofline(params * b + activations, 2 * params * tokens)
        attn_bytes = b * (tokens * (2 * q_dim + 2 * kv_dim) + kv_read * 2 * kv_dim)
        attention = np.where(tokens > 0, self._roofline(attn_bytes, 4 * q_dim * pairs), 0.0)
        return linear + attention, comm

    def stage_time(self, layout: Layout, tokens, pairs, kv_read, samples, *, prefill=None):
        """(compute, communication) seconds of the slowest pipeline stage for one micro-batch.

        The first stage adds the vocab-parallel embedding's all-reduce, the last the LM head on ``samples``
        rows and the all-gather of their logits; every stage but the last sends its activations on. With a
        profile, every stage adds the measured rest of a forward and the last the measured head and
        sampling (every sequence of a step samples, so ``samples`` is also the micro-batch's sequences).
        """
        d, tp, b = self.dims, layout.tp, self.dtype_bytes
        tokens, pairs, kv_read, samples = (np.asarray(x, dtype=float) for x in (tokens, pairs, kv_read, samples))
        layer_compute, layer_comm = self.layer_time(layout, tokens, pairs, kv_read, seqs=samples, prefill=prefill)
        active = tokens > 0
        rest = (np.where(active, self.profile.rest_time(tokens, samples), 0.0) if self.profile is not None
                else np.zeros_like(tokens))
        best_total = best_compute = best_comm = None
        for layers, embed, head in {s for s in self.stages(layout.pp)}:
            compute = layers * layer_compute + rest
            comm = layers * layer_comm
            if embed:
                comm = comm + np.where(active, self.allreduce_time(tokens * d.hidden_size * b, tp), 0.0)
            if head:
                vocab = self.vocab_params(tp)
                head = (self.profile.head_time(samples) if self.profile is not None
                        else self._roofline(vocab * b, 2 * vocab * samples))
                compute = compute + np.where(active, head, 0.0)
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

        The replica's ``seqs`` sequences are cut into m = min(pp, seqs) equal micro-batches (a streaming step
        with pp > 1: min(pp * prefill_micro_batches, seqs)).
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
        micro = np.clip(seqs, 1, self._micro_batches(pp, streaming))
        compute, comm = self.stage_time(layout, *(np.asarray(x, dtype=float) / micro
                                                  for x in (tokens, pairs, kv_read, samples)), prefill=streaming)
        if pipeline == "synchronous":
            factor = micro + pp - 1
        else:
            factor = micro if streaming else np.full_like(micro, pp)
        factor = np.where(seqs > 0, factor, 0.0)
        overhead = np.where(seqs > 0, self.step_overhead, 0.0)
        return factor * (compute + comm) + overhead, factor * comm

    def _micro_batches(self, pp: int, streaming: bool) -> int:
        return pp * self.prefill_micro_batches if streaming and pp > 1 else pp

    def fill_time(self, layout: Layout, seqs, tokens, pairs, kv_read, samples) -> float:
        """Pipeline fill of a streaming phase (overlapped pipeline): pp - 1 stage times of its first step."""
        micro = max(1.0, min(float(seqs), self._micro_batches(layout.pp, True)))
        compute, comm = self.stage_time(layout, *(np.asarray(float(x)) / micro for x in (tokens, pairs, kv_read,
                                                                                           samples)), prefill=True)
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
