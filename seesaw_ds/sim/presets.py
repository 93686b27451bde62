"""The planner's settings: dataclass schemas (registered with Hydra) and the presets in ``conf/planner/``.

``conf/planner/config.yaml`` holds the planner's knobs under ``planner.*``; the groups ``gpu/``, ``model/``
and ``workload/`` hold one preset per file, picked by name (``planner.gpu=a10``). Presets are written in
the units of spec sheets (GiB, GiB/s, TFLOP/s, microseconds) and converted here, once, into the cost
model's units (bytes, bytes/s, FLOP/s, seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from seesaw_ds.distributed.layout import ModelDims
from seesaw_ds.sim.cost import GIB, Efficiency, GpuSpec
from seesaw_ds.sim.workload import Workload, arxiv, from_jsonl, sharegpt

PLANNER_CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "planner"


class PresetError(ValueError):
    """An unknown or malformed preset; the message is one line naming the value and the choices."""


@dataclass
class GpuPreset:
    """A GPU type as a spec sheet states it (conf/planner/gpu/*.yaml)."""

    name: str = MISSING
    memory_gib: float = MISSING
    """Device memory (GiB)."""
    hbm_gib_per_s: float = MISSING
    """Device memory bandwidth (GiB/s)."""
    peak_tflops: float = MISSING
    """Dense fp16/bf16 tensor peak (TFLOP/s = 1e12 FLOP/s)."""
    interconnect: str = "pcie"
    """pcie | nvlink: the GPU-to-GPU path of TP all-reduce and PP send/recv."""
    link_gib_per_s: float = MISSING
    """GPU-to-GPU bandwidth per GPU (GiB/s)."""
    link_latency_us: float = 5.0
    """Latency of one ring step / message (microseconds)."""
    host_gib_per_s: float = MISSING
    """Host-to-device bandwidth per GPU (GiB/s)."""
    source: str = ""
    """Where the figures come from."""

    def spec(self) -> GpuSpec:
        if self.interconnect not in ("pcie", "nvlink"):
            raise PresetError(f"gpu preset {self.name!r}: interconnect={self.interconnect!r} must be pcie or nvlink")
        return GpuSpec(name=self.name, memory_bytes=self.memory_gib * GIB, hbm_bandwidth=self.hbm_gib_per_s * GIB,
                       peak_flops=self.peak_tflops * 1e12, interconnect=self.interconnect,
                       link_bandwidth=self.link_gib_per_s * GIB, link_latency=self.link_latency_us * 1e-6,
                       host_bandwidth=self.host_gib_per_s * GIB)


@dataclass
class ModelPreset:
    """A model's shape from its Hugging Face config.json (conf/planner/model/*.yaml)."""

    hf_id: str = ""
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    head_dim: Optional[int] = None
    """None = hidden_size / num_heads."""

    def dims(self) -> ModelDims:
        return ModelDims(num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         head_dim=self.head_dim or self.hidden_size // self.num_heads, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, vocab_size=self.vocab_size)


@dataclass
class WorkloadPreset:
    """A request set (conf/planner/workload/*.yaml)."""

    kind: str = MISSING
    """sharegpt | arxiv (synthetic, seeded) | jsonl (token counts from a file)."""
    num_requests: int = 0
    seed: int = 0
    path: Optional[str] = None
    """jsonl: the file (planner.workload_path overrides it)."""


@dataclass
class PlannerConfig:
    """What to plan for and how to simulate it (`planner.*`)."""

    gpu: str = "a10"
    """GPU preset: a file name in conf/planner/gpu/."""
    num_gpus: int = 8
    """GPUs of one instance; both layouts use all of them (dp*tp*pp == num_gpus)."""
    model: str = "codellama_34b"
    """Model preset: a file name in conf/planner/model/."""
    workload: str = "arxiv"
    """Workload preset (conf/planner/workload/) or a path to a JSONL file."""
    workload_path: Optional[str] = None
    """JSONL of {prompt_tokens, max_tokens} lines for workload=jsonl."""
    num_requests: Optional[int] = None
    """Synthetic workloads: requests to draw (None = the preset's)."""
    seed: Optional[int] = None
    """Synthetic workloads: seed (None = the preset's)."""
    output: Optional[str] = None
    """Write the plan as JSON here."""
    top: int = 20
    """Rows of the ranked table to print."""
    pipeline: str = "overlapped"
    """overlapped (vLLM, the paper) | synchronous (today's seesaw_ds executor: fill and drain every step)."""
    dp_lockstep: bool = False
    """True: data-parallel replicas wait for each other every step (today's engine)."""
    interconnect_scale: float = 1.0
    """Multiply the GPU-to-GPU bandwidth (what-if studies)."""
    step_overhead_ms: float = 0.0
    """Fixed milliseconds per engine step outside GPU kernels (CPU scheduling, launches), both systems."""
    replication: Optional[int] = None
    """Simulate every k-th request at 1/k capacity, each standing for k (None = auto, see max_simulated_requests)."""
    max_simulated_requests: int = 500
    """With replication unset, k = ceil(requests / this)."""
    memory_utilization: float = 0.9
    """Share of device memory for weights, activations and KV (vLLM's gpu_memory_utilization)."""
    host_memory_gib_per_gpu: float = 80.0
    """Host memory per GPU (the paper allots 80 GiB)."""
    host_memory_fraction: float = 0.3
    """Share of host memory the staging area takes (kv.host_memory_fraction)."""
    staging_tokens: Optional[int] = None
    """Staging capacity in tokens (None = from the two host-memory settings)."""
    block_size: int = 16
    max_prefill_tokens: int = 4096
    """Prompt tokens per prefill step per prefill replica."""
    max_seqs: int = 256
    """Sequences per decode micro-batch (Seesaw: scheduler.max_decode_seqs = this * decode pp) and per
    vLLM virtual engine (max_num_seqs)."""
    low_watermark: float = 0.2
    chunk_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    """Chunk sizes (max_num_batched_tokens) the vLLM baseline is tuned over."""
    efficiency: Efficiency = field(default_factory=Efficiency)
    """Fractions of peak that kernels reach (fixed a priori; see docs/planner.md)."""


@dataclass
class PlannerRoot:
    planner: PlannerConfig = field(default_factory=PlannerConfig)


def register() -> None:
    """Register the schema as `planner_schema` (the base of conf/planner/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="planner_schema", node=PlannerRoot)


def preset_names(group: str) -> list[str]:
    return sorted(p.stem for p in (PLANNER_CONF_DIR / group).glob("*.yaml"))


def load_preset(group: str, name: str, schema: type) -> Any:
    """The preset ``name`` of ``group`` checked against ``schema``; PresetError names the valid choices."""
    path = PLANNER_CONF_DIR / group / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise PresetError(f"planner.{group}={name!r} is not a preset; choose one of "
                          f"{', '.join(preset_names(group))} (files in {PLANNER_CONF_DIR / group})")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except Exception as error:  # noqa: BLE001 - OmegaConf raises many types; all mean a bad preset file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PresetError(f"preset {path}: {first}") from None


def gpu_spec(name: str) -> GpuSpec:
    return load_preset("gpu", name, GpuPreset).spec()


def model_dims(name: str) -> ModelDims:
    return load_preset("model", name, ModelPreset).dims()


def load_workload(name: str, *, path: str | None = None, num_requests: int | None = None,
                  seed: int | None = None) -> Workload:
    """A workload preset by name, or a JSONL file when ``name`` ends in .jsonl."""
    if name.endswith(".jsonl"):
        return from_jsonl(name)
    preset: WorkloadPreset = load_preset("workload", name, WorkloadPreset)
    count = num_requests or preset.num_requests
    seed = preset.seed if seed is None else seed
    if preset.kind == "sharegpt":
        return sharegpt(count, seed)
    if preset.kind == "arxiv":
        return arxiv(count, seed)
    if preset.kind == "jsonl":
        file = path or preset.path
        if not file:
            raise PresetError("planner.workload=jsonl needs planner.workload_path=<a JSONL file>")
        return from_jsonl(file)
    raise PresetError(f"workload preset {name!r}: kind={preset.kind!r} must be sharegpt, arxiv or jsonl")
