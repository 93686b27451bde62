"""The job's settings: dataclass schemas registered in Hydra's ConfigStore (values live in ``conf/``).

Hydra checks every override against these schemas, so a mistyped key or a wrong type is an error before
any rank starts. ``to_settings`` turns the composed config into these plain dataclasses once, at the entry
point, so no ``DictConfig`` travels inward. Hydra and OmegaConf are imported only there: the schema itself
is plain dataclasses, which the engine's pure parts (engine/scheduler.py) import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from seesaw_ds.distributed.layout import Layout


@dataclass
class ModelConfig:
    """Which checkpoint to serve and how."""

    path: Optional[str] = None
    """Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer); None = the embedded tiny model."""
    dtype: str = "auto"
    """Weights and KV dtype: auto (the checkpoint's), float32, bfloat16, float16."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint."""
    max_model_len: Optional[int] = None
    """Longest prompt + output in tokens; None = the model's max_position_embeddings."""
    cpu_prepack: bool = True
    """bfloat16 on a CPU: run the linears on oneDNN-prepacked copies of this rank's weights, one per layout
    (bit-identical results, faster calls; memory: each layout's shard of the weights once more beside the
    node-shared copy). false: the weights stay views of the node-shared copy. Either way, on a CPU with
    AVX512_BF16 inputs of one or two rows (decode at batch 1-2) stream the views through the extension's
    few-row kernel, which needs no copy. On a CPU whose oneDNN has no bf16 path (AVX2 only) the copies are the
    weights widened to float32 (twice the bytes; 5-7x faster than the emulated bf16 GEMM), and false widens
    the views at every call (the same bits, slower)."""
    compile: str = "${oc.env:SEESAW_MODEL_COMPILE,auto}"
    """torch.compile (inductor) of the decoder layers: true, false, or auto (bf16/fp16 on an accelerator or
    a CPU with AMX, where it measured faster; eager elsewhere). The default is $SEESAW_MODEL_COMPILE where set
    (the test suite runs eager that way). A stage compiles at most three graphs (one layer's call, shared by
    every layer), cached on disk under $SEESAW_CACHE/inductor, so a second job on the node starts warm;
    compile seconds are in the metrics and on the progress line (seesaw_ds/model/compiled.py)."""
    cuda_graphs: str = "auto"
    """CUDA graphs of the decode step, one per batch-size bucket (1, 2, 4, then multiples of 8 up to
    scheduler.max_decode_seqs), captured on first use after an eager warm-up and again after each layout switch,
    each checked against that warm-up: true, false, or auto (a bucket keeps its graph where its replay measured
    faster than the eager step). Only on CUDA, for one-stage decode layouts whose all-reduce is NCCL's and
    families without experts or length-dependent rotary embeddings; capture seconds count as compile seconds
    (seesaw_ds/model/graphs.py)."""


@dataclass
class LayoutConfig:
    """One parallel layout of an instance: dp replicas of pp stages of tp ranks."""

    dp: int = 1
    """Data-parallel replicas inside the instance."""
    tp: int = 1
    """Tensor-parallel degree (must divide the attention heads)."""
    pp: int = 1
    """Pipeline stages (at most the number of layers)."""


@dataclass
class ParallelConfig:
    """The prefill and decode layouts; dp*tp*pp must be equal for both and divide the job's ranks."""

    prefill: LayoutConfig = field(default_factory=lambda: LayoutConfig(pp=2))
    """Layout for prefill steps (compute-bound: pipeline or data parallel wins)."""
    decode: LayoutConfig = field(default_factory=lambda: LayoutConfig(tp=2))
    """Layout for decode steps (weight-bandwidth-bound: tensor parallel wins)."""
    prefill_micro_batches: int = 8
    """Micro-batches per pipeline stage in a prefill step (pp > 1 only): the pipeline bubble is
    (pp-1)/(m+pp-1) of the step for m micro-batches; whole prompts are never split. 8 measured +2-6% over 4
    on the standard CPU benchmark (docs/benchmarks.md)."""
    auto: bool = False
    """Let the planner choose both layouts for this machine, model and input (``parallel=auto``; see
    seesaw_ds/sim/auto.py): resolved once before the ranks start; explicit parallel.prefill/decode axes win."""
    auto_fewer_ranks: bool = True
    """parallel=auto on a CPU: launch.nproc is the most ranks, and the plan may start fewer, each with more of
    the cores' threads (one rank x 2 threads rather than dp2 for a batch too small to keep two replicas busy),
    each rank count priced by its own calibration. On the 2-core AMD box (quiet machine) it picks one rank x 2
    threads for the batch-1 preset (decode step 27-28 ms against dp2's 34; predicted 81 against 86 measured
    tokens/s) and keeps dp2 for decode_only and standard (docs/benchmarks.md, issue 22); false = always
    launch.nproc ranks."""
    recalibrate: bool = False
    """parallel=auto: measure this machine again instead of planning with its calibration kept from an earlier
    start (``$SEESAW_CACHE/calibration/``, one per machine, job shape and engine code; seesaw_ds/sim/
    calibration_cache.py); the new figures replace the kept ones."""


@dataclass
class LaunchConfig:
    """How ranks are started."""

    nproc: int = 2
    """Ranks to start with mpiexec when not already under mpiexec/srun."""
    ranks_per_node: Optional[int] = None
    """Treat every N consecutive ranks as one node (testing multi-node on one host); None = detect."""
    comm_timeout_s: float = 300.0
    """Collective timeout: a rank that stops answering ends the job after this many seconds."""
    master_addr: Optional[str] = None
    """Rendezvous address of rank 0 (torch.distributed's MASTER_ADDR); None = an exported MASTER_ADDR, else
    chosen: loopback on one host, an address of rank 0's node that the other nodes can reach otherwise
    (seesaw_ds/distributed/rendezvous.py)."""
    mpiexec: str = "mpiexec"
    """The MPI launcher used outside Slurm (the mpich wheel's, from the venv)."""
    hugepages: bool = True
    """Start the ranks with glibc's transparent-huge-page tunable (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``):
    +0.4% and +4.5% output tok/s in two same-run comparisons on the standard CPU benchmark (docs/benchmarks.md).
    No effect where THP is off or glibc is older than 2.35. slurm/run.sh applies it to srun's ranks unless
    ``launch.hugepages=false`` is given."""
    bind: str = "cores"
    """Bind each rank to its own cores, as HPC users expect (steady run-to-run figures): ``cores`` (the
    default) gives each of mpiexec's ranks ``cores // nproc`` whole physical cores of its own (``-bind-to
    user:...``; left unbound when there are more ranks than cores), and slurm/run.sh runs srun with
    ``--cpu-bind=cores`` (a ``SLURM_CPU_BIND`` of the user's own wins); ``none`` leaves the ranks free to
    move. Each rank runs as many torch threads as it has cores (seesaw_ds/distributed/env.py
    ``cores_per_rank``)."""


@dataclass
class KVConfig:
    """The two KV tiers."""

    host_tokens: Optional[int] = None
    """Capacity of the host staging area per instance, in tokens; None = sized from free host memory."""
    host_memory_fraction: float = 0.3
    """With host_tokens unset: the share of the host memory the staging area may take (available memory,
    capped by the job's cgroup limit and /dev/shm's free space; seesaw_ds/kv/sizing.py)."""
    device_tokens: Optional[int] = None
    """Capacity of the device-tier paged cache per data-parallel replica, in tokens; None = sized at start-up
    from device_memory_fraction, at most scheduler.max_decode_seqs x model.max_model_len (docs/cluster.md)."""
    device_memory_fraction: Optional[float] = None
    """With device_tokens unset: the share of memory the device tier may take. None = 0.9 of the GPU's memory
    (vLLM's gpu_memory_utilization; in-use memory and the weights come off it, the rest is headroom for
    activations), or on a CPU 0.3 of the available host memory left beside the staging area, shared by the
    host's ranks (the two tiers then take about half of what is available, leaving room for other jobs)."""
    block_size: int = 16
    """Tokens per device-tier block."""
    prefix_sharing: bool = True
    """Compute a prompt prefix that several requests share once (for the prefill replicas of a node: they read
    one staging area; kv/plan.py prefix_homes), keep its KV once in the
    staging area and reuse it for the others (seesaw_ds/engine/prefixes.py, docs/sampling.md); false = every
    prompt is computed whole. Requests asking for prompt_logprobs or penalties that read the prompt are always
    computed whole."""
    prefix_min_tokens: int = 32
    """Shortest shared prefix worth reusing (a multiple of block_size is found: prompts are compared block by
    block). 32 reuses a chat template's system preamble (SmolLM2's is 33-38 tokens): on the bench's 128 chat
    prompts 3,712 prompt tokens saved instead of 672 at 64, prefill_only 26.4-26.9 s against 27.4-28.0 s
    (quiet AMD EPYC, three interleaved pairs, docs/benchmarks.md)."""
    prefix_window_tokens: int = 65536
    """Prompt tokens read ahead of the prefill (at least scheduler.max_prefill_tokens) while prefix_sharing is
    on: requests that share a prefix find each other only while both wait, and a pair of chat prompts sharing
    a long conversation can lie far apart in the input (the bench's 128 prompts: up to ~35,000 tokens;
    prefill_only reused 5,840 prompt tokens at 65,536 against 4,256 at 4,096, and 3,712 before a longer shared
    prefix replaced a waiting request's shorter key; vLLM's prefix caching reuses 6,832, docs/benchmarks.md)."""
    prefix_cache_tokens: Optional[int] = None
    """Staging tokens the computed prefixes may keep (least recently used dropped first); None = a quarter
    of the staging area."""


#: Values of ``scheduler.policy`` (engine/scheduler.py implements them).
POLICIES = ("seesaw", "prefill_first", "decode_first")


@dataclass(kw_only=True)
class SchedulerConfig:
    """Phase scheduling (``scheduler.*``): the policy knobs engine/scheduler.py and the simulator read."""

    policy: str = "seesaw"
    """`seesaw` (transition-minimizing), `prefill_first` (vLLM-like) or `decode_first` (FasterTransformer-like)."""
    max_prefill_tokens: int = 4096
    """Prompt tokens per prefill step, all prefill replicas together; a longer single prompt still runs alone."""
    low_watermark: float = 0.2
    """seesaw: go back to prefill once staging occupancy is below this fraction and prompts wait."""
    max_decode_seqs: int = 256
    """Running sequences per decode replica."""
    admit_headroom: float = 0.05
    """Fraction of a replica's device blocks kept free when admitting, as growth room (avoids evict/admit thrash)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler.policy={self.policy!r} is unknown; use one of {', '.join(POLICIES)}")
        if self.max_prefill_tokens < 1 or self.max_decode_seqs < 1:
            raise ValueError(f"scheduler.max_prefill_tokens={self.max_prefill_tokens} and scheduler.max_decode_seqs="
                             f"{self.max_decode_seqs} must both be >= 1")
        if not 0.0 <= self.low_watermark <= 1.0 or not 0.0 <= self.admit_headroom < 1.0:
            raise ValueError(f"scheduler.low_watermark={self.low_watermark} must lie in [0, 1] and "
                             f"scheduler.admit_headroom={self.admit_headroom} in [0, 1)")


@dataclass
class SamplingConfig:
    """Job-wide sampling defaults (vLLM names); None = not set (the model's generation_config decides)."""

    n: Optional[int] = None
    """Samples (completions) per request, 1-128; each prompt is prefilled once (docs/sampling.md)."""
    max_tokens: Optional[int] = None
    min_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = None
    presence_penalty: Optional[float] = None
    """Subtracted once from the logit of each token already in the output, in [-2, 2]."""
    frequency_penalty: Optional[float] = None
    """Subtracted from a token's logit per occurrence in the output, in [-2, 2]."""
    repetition_penalty: Optional[float] = None
    """> 0; tokens of the prompt or output: positive logits divided by it, negative ones multiplied."""
    min_p: Optional[float] = None
    """In [0, 1]: drop tokens less likely than min_p times the most likely one (after temperature)."""
    logit_bias: Optional[dict[int, float]] = None
    """{token id: bias in [-100, 100]} added to every request's logits."""
    bad_words: Optional[list[str]] = None
    """Words no request generates (vLLM's bad_words)."""
    logprobs: Optional[int] = None
    """Return each generated token's logprob and this many top tokens beside it (0-20)."""
    prompt_logprobs: Optional[int] = None
    """Return each prompt token's logprob and this many top tokens beside it (0-20)."""


@dataclass
class IOConfig:
    """Where requests come from and results go."""

    input: Optional[str] = None
    """Input JSONL; None = the bundled sample prompts."""
    output: Optional[str] = None
    """Output JSONL (appended, resumable); None = outputs.jsonl in the run directory."""
    errors: Optional[str] = None
    """Bad input lines; None = <output stem>.errors.jsonl beside the output."""
    metrics: Optional[str] = None
    """Metrics JSON; None = <output stem>.metrics.json beside the output."""
    progress_interval_s: float = 5.0
    """Seconds between progress lines on rank 0."""
    force_resume: bool = False
    """Append to an output made with another model, tokenizer or sampling config (normally refused)."""


@dataclass
class JobConfig:
    """A whole seesaw_ds job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    io: IOConfig = field(default_factory=IOConfig)
    seed: int = 0
    """Job seed: requests without their own seed sample from a seed derived from it and their custom_id."""
    run_dir: Optional[str] = None
    """Where this run's files go (decided once, by the launcher); None = Hydra's run directory."""


def register() -> None:
    """Register the schema with Hydra's ConfigStore (the base of conf/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)


def layout_of(config: LayoutConfig) -> Layout:
    return Layout(dp=config.dp, tp=config.tp, pp=config.pp)


def to_settings(cfg: Any) -> JobConfig:
    """Composed Hydra config (DictConfig) -> plain :class:`JobConfig`."""
    from omegaconf import OmegaConf

    if isinstance(cfg, JobConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    return OmegaConf.to_object(merged)
