"""``parallel=auto``: the planner picks the job's (prefill, decode) layouts for the machine it runs on.

Run once, in the launcher process before any rank starts (``launch/run.py``), or on rank 0 of a job that
srun started directly (``cli.worker_main``, which broadcasts the result), so every rank runs the same
layouts:

1. :func:`~seesaw_ds.sim.calibrate.measure` times this machine (a few seconds, with the engine's profile)
   once: the figures are kept under ``$SEESAW_CACHE/calibration/`` for this machine, job shape and engine
   (:mod:`seesaw_ds.sim.calibration_cache`), so every later start plans with the same ones
   (``parallel.recalibrate=true`` measures again); :func:`~seesaw_ds.sim.calibrate.hardware_spec` describes
   one rank of it for the cost model;
2. the model comes from its config.json, the workload from the first ``sample_lines`` requests of the
   input file (prompt lengths after tokenization, ``max_tokens`` after the sampling defaults);
3. :class:`~seesaw_ds.sim.planner.Planner` simulates every layout pair of the job's ranks with the
   engine's own scheduler, priced as today's executor runs (synchronous pipeline, DP in lockstep). On a
   CPU, with ``parallel.auto_fewer_ranks`` (on by default) and the launcher yet to start the ranks, it also simulates *fewer ranks with more
   threads each*
   (:func:`rank_counts`: 1 rank x 2 threads beside 2 ranks x 1 thread on two cores), each priced by its own
   calibration (the engine timed with that many threads: the machine's thread scaling, measured once and
   kept like the rest): a batch too small to keep every replica busy runs faster on one rank with all the
   cores than on one replica of a dp2 whose other core idles;
4. the best runnable candidate (a Seesaw pair or a static layout) becomes explicit overrides for the ranks
   (:meth:`AutoChoice.overrides`), with the ``scheduler.max_decode_seqs`` and ``kv.device_tokens`` the
   prediction assumed, and ``launch.nproc`` where it chose fewer ranks. Layout axes, ``kv.device_tokens``
   and ``scheduler.max_decode_seqs`` the user gave win: the planner then only chooses among candidates that
   agree with them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence
from pathlib import Path

import numpy as np

from seesaw_ds.distributed.layout import Layout, LayoutError, ModelDims
from seesaw_ds.kv.blocks import blocks_for
from seesaw_ds.sim.calibrate import MEASURED_EFFICIENCY, Calibration, hardware_spec, rank_threads
from seesaw_ds.sim.planner import Candidate, Planner, PlanOptions
from seesaw_ds.sim.workload import Workload

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_SEQS_PER_MICRO_BATCH = 256
"""The planner's decode batch per micro-batch (vLLM's max_num_seqs); max_decode_seqs = this * decode pp."""


@dataclass(frozen=True)
class JobFacts:
    """What the planner needs from the job's settings (plain values, so the pure parts are testable)."""

    num_ranks: int
    dtype_bytes: int
    block_size: int = 16
    max_prefill_tokens: int = 4096
    low_watermark: float = 0.2
    host_tokens: int | None = None
    """kv.host_tokens (None: host_memory_fraction of the available host memory)."""
    host_memory_fraction: float = 0.3
    fixed_prefill: Layout | None = None
    """A prefill layout the user gave explicitly (parallel.prefill.*): only candidates with it count."""
    fixed_decode: Layout | None = None
    device_tokens: int | None = None
    """kv.device_tokens the user gave explicitly (else the plan sizes it)."""
    max_decode_seqs: int | None = None
    """scheduler.max_decode_seqs the user gave explicitly (else max_seqs * decode pp)."""
    prefill_micro_batches: int = 8
    """parallel.prefill_micro_batches: prefill micro-batches per pipeline stage when pp > 1."""


@dataclass
class AutoChoice:
    """The layouts chosen for a job and what the planner predicts for them."""

    prefill: Layout
    decode: Layout
    kind: str
    """seesaw (two layouts) | static (one)."""
    throughput: float
    """Predicted prompt + output tokens/s."""
    output_throughput: float
    max_decode_seqs: int
    device_tokens: int
    hardware: dict = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    ranking: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    launch_nproc: int | None = None
    """Ranks to start instead of the job's ``launch.nproc`` (a plan of fewer ranks, each with more threads);
    None: as many as the job gave."""
    threads: int | None = None
    """Threads each rank of the plan runs (CPU; None where the calibration does not say)."""

    def overrides(self, given: list[str]) -> list[str]:
        """Explicit Hydra overrides for the ranks: ``given`` without the auto switch, plus the chosen layouts
        and sizes (keys the user set in ``given`` are kept as the user wrote them)."""
        keys = {o.split("=", 1)[0].lstrip("+~") for o in given if "=" in o}
        replaced = ("parallel", "parallel.auto") + (("launch.nproc",) if self.launch_nproc is not None else ())
        out = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in replaced]
        if self.launch_nproc is not None:
            out.append(f"launch.nproc={self.launch_nproc}")
        for phase, layout in (("prefill", self.prefill), ("decode", self.decode)):
            if not any(k.startswith(f"parallel.{phase}") for k in keys):
                out += [f"parallel.{phase}.{axis}={getattr(layout, axis)}" for axis in ("dp", "tp", "pp")]
        if "scheduler.max_decode_seqs" not in keys:
            out.append(f"scheduler.max_decode_seqs={self.max_decode_seqs}")
        if "kv.device_tokens" not in keys:
            out.append(f"kv.device_tokens={self.device_tokens}")
        return out

    def line(self) -> str:
        """One line for the log: what was chosen and the predicted throughput."""
        what = (f"prefill {self.prefill} -> decode {self.decode}" if self.kind == "seesaw"
                else f"static {self.prefill}")
        if self.launch_nproc is not None:
            ranks = self.launch_nproc
            what += (f" on {ranks} rank{'s' if ranks > 1 else ''}"
                     + (f" x {self.threads} threads" if self.threads else "") + " (fewer ranks, more threads each)")
        return (f"parallel=auto chose {what} (scheduler.max_decode_seqs={self.max_decode_seqs}, "
                f"kv.device_tokens={self.device_tokens}): predicted {self.throughput:.0f} tokens/s "
                f"({self.output_throughput:.0f} output tokens/s) on {self.hardware.get('name', '?')}, "
                f"{len(self.ranking)} candidates, {self.workload.get('num_requests', '?')} sampled requests"
                + ("; machine calibration kept from an earlier start (parallel.recalibrate=true measures again)"
                   if self.hardware.get("calibration_cached") else ""))

    def to_json(self) -> dict:
        layout = lambda x: {"dp": x.dp, "tp": x.tp, "pp": x.pp}  # noqa: E731
        return {"prefill": layout(self.prefill), "decode": layout(self.decode), "kind": self.kind,
                "predicted_tokens_per_second": self.throughput,
                "predicted_output_tokens_per_second": self.output_throughput,
                "scheduler.max_decode_seqs": self.max_decode_seqs, "kv.device_tokens": self.device_tokens,
                "hardware": self.hardware, "workload": self.workload, "ranking": self.ranking,
                "timings_s": self.timings, "launch.nproc": self.launch_nproc, "threads_per_rank": self.threads}


# -- pure parts ---------------------------------------------------------------------------------------------
def fixed_layouts(overrides: list[str]) -> dict[str, Layout | None]:
    """The phases whose layout the user gave axis by axis (``parallel.prefill.tp=2``): unnamed axes are 1,
    as :func:`seesaw_ds.cli.complete_layout_overrides` makes them."""
    out: dict[str, Layout | None] = {"prefill": None, "decode": None}
    for phase in out:
        prefix = f"parallel.{phase}."
        axes = {o.split("=", 1)[0].lstrip("+")[len(prefix):]: o.split("=", 1)[1]
                for o in overrides if o.lstrip("+").startswith(prefix) and "=" in o}
        if axes:
            try:
                out[phase] = Layout(**{axis: int(axes.get(axis, 1)) for axis in ("dp", "tp", "pp")})
            except (TypeError, ValueError):
                raise ValueError(f"parallel.{phase}.* overrides {axes} must be integers dp, tp, pp") from None
    return out


def rank_counts(num_ranks: int) -> list[int]:
    """The rank counts a CPU job of ``num_ranks`` ranks may run as (pure): ``num_ranks`` first, then each
    smaller divisor of it, largest first -- fewer ranks over the same cores, each with ``cores // ranks``
    threads (:func:`~seesaw_ds.sim.calibrate.rank_threads`, as the ranks set them at start-up)."""
    if num_ranks < 1:
        raise ValueError(f"launch.nproc={num_ranks} must be >= 1")
    return [num_ranks] + [r for r in range(num_ranks - 1, 0, -1) if num_ranks % r == 0]


def device_tokens_cap(workload: Workload, num_ranks: int, block_size: int) -> int:
    """Device-tier tokens a replica can use at most on this workload: the most sequences that can decode
    at once (the sampled requests, or the batch limit), each at its longest, in whole blocks."""
    seqs = min(workload.num_requests, MAX_SEQS_PER_MICRO_BATCH * num_ranks)
    tokens = seqs * workload.max_len
    return blocks_for(tokens, block_size) * block_size


def plan_options(facts: JobFacts, calibration: Calibration, workload: Workload) -> PlanOptions:
    """How to simulate the job: measured figures at face value (compute from the engine's own profile
    where the calibration has one), today's executor (synchronous pipeline, its prefill micro-batches,
    data-parallel replicas in lockstep), the job's scheduler and KV settings; no vLLM baseline (seesaw_ds
    cannot run it)."""
    host_per_rank = calibration.host_memory_bytes / max(1, facts.num_ranks)  # the staging area's pool
    return PlanOptions(pipeline="synchronous", dp_lockstep=True, efficiency=MEASURED_EFFICIENCY,
                       memory_utilization=1.0, host_memory_bytes_per_gpu=host_per_rank,
                       host_memory_fraction=facts.host_memory_fraction, staging_tokens=facts.host_tokens,
                       block_size=facts.block_size, max_prefill_tokens=facts.max_prefill_tokens,
                       max_seqs=(MAX_SEQS_PER_MICRO_BATCH if facts.max_decode_seqs is None
                                 else max(1, facts.max_decode_seqs)),
                       low_watermark=facts.low_watermark, chunk_sizes=(), dtype_bytes=facts.dtype_bytes,
                       profile=calibration.profile, prefill_micro_batches=facts.prefill_micro_batches,
                       device_tokens=facts.device_tokens or device_tokens_cap(workload, facts.num_ranks,
                                                                              facts.block_size))


def make_planner(facts: JobFacts, calibration: Calibration, dims: ModelDims, workload: Workload) -> Planner:
    return Planner(hardware_spec(calibration), facts.num_ranks, dims, workload,
                   plan_options(facts, calibration, workload))


def choose(facts: JobFacts, calibration: Calibration, dims: ModelDims, workload: Workload,
           usable: Callable[[Layout], bool] | None = None, fewer: Sequence[Calibration] = ()) -> AutoChoice:
    """The best runnable candidate for the job (pure given the calibrations): ValueError when none fits.
    ``usable`` rejects layouts the model family cannot shard (e.g. intermediate sizes tp does not divide).
    ``fewer``: calibrations of this machine for fewer ranks than ``facts.num_ranks`` (each with more threads,
    :func:`rank_counts`); their layouts compete too, and a winner among them is started with its own
    ``launch.nproc``."""
    began = time.perf_counter()
    options: list[tuple[Candidate, Planner, Calibration]] = []
    infeasible: list[dict] = []
    for each in fewer:
        if each.ranks >= facts.num_ranks:
            raise ValueError(f"choose: a calibration of {each.ranks} ranks is no fewer-ranks option of a "
                             f"{facts.num_ranks}-rank job")
    for ranks, each in ((facts.num_ranks, calibration), *((c.ranks, c) for c in fewer)):
        planner = make_planner(replace(facts, num_ranks=ranks), each, dims, workload)
        result = planner.run()
        options += [(c, planner, each) for c in result.candidates]
        infeasible += result.infeasible
    options.sort(key=lambda option: -option[0].result.throughput)
    wanted = [(c, planner, each) for c, planner, each in options
              if (facts.fixed_prefill is None or c.prefill == facts.fixed_prefill)
              and (facts.fixed_decode is None or c.decode == facts.fixed_decode)
              and (usable is None or (usable(c.prefill) and usable(c.decode)))]
    if not wanted:
        why = "; ".join(f"{bad['layout']}: {bad['reason']}" for bad in infeasible[:3])
        fixed = {k: str(v) for k, v in (("prefill", facts.fixed_prefill), ("decode", facts.fixed_decode)) if v}
        raise ValueError(f"parallel=auto found no layout of {facts.num_ranks} rank(s) that runs this model"
                         + (f" with the given {fixed}" if fixed else "") + (f" ({why})" if why else "")
                         + "; change launch.nproc or give parallel.prefill.*/parallel.decode.*")
    best, planner, chosen = wanted[0]
    seqs_per_batch = planner.options.max_seqs
    max_decode_seqs = facts.max_decode_seqs or seqs_per_batch * best.decode.pp
    device_tokens = planner.pair_kv_tokens(best.prefill, best.decode)
    threads = lambda each: rank_threads(each.cores, each.ranks) if each.device == "cpu" else None  # noqa: E731
    return AutoChoice(
        best.prefill, best.decode, best.kind, best.result.throughput, best.result.output_throughput,
        max_decode_seqs, device_tokens, hardware={**chosen.to_json(), "name": planner.gpu.name},
        workload={"name": workload.name, "num_requests": workload.num_requests,
                  "prompt_tokens": workload.prompt_tokens, "output_tokens": workload.output_tokens,
                  "max_len": workload.max_len},
        ranking=[{"kind": c.kind, "prefill": str(c.prefill), "decode": str(c.decode),
                  "predicted_tokens_per_second": c.result.throughput,
                  **({"ranks": each.ranks, "threads_per_rank": threads(each)} if fewer else {})}
                 for c, _, each in wanted],
        timings={"plan": time.perf_counter() - began},
        launch_nproc=best.prefill.num_ranks if best.prefill.num_ranks != facts.num_ranks else None,
        threads=threads(chosen))


# -- reading the job ------------------------------------------------------------------------------------------
def family_usable(model_path: str | Path) -> Callable[[Layout], bool]:
    """Whether the model's family can shard a layout (its intermediate sizes divide by tp)."""
    from transformers import AutoConfig

    from seesaw_ds.model.families import model_spec

    spec = model_spec(AutoConfig.from_pretrained(model_path))

    def usable(layout: Layout) -> bool:
        try:
            spec.check_tp("auto", layout.tp)
        except LayoutError:
            return False
        return True
    return usable


def job_dtype(model_path: str | Path, dtype: str | None) -> str:
    """The dtype name the job computes in: ``model.dtype``, or the checkpoint's for None/auto."""
    from transformers import AutoConfig

    if dtype in (None, "auto"):
        config = AutoConfig.from_pretrained(model_path)
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model.dtype={dtype!r}: parallel=auto knows {', '.join(DTYPE_BYTES)}")
    return dtype


def checkpoint_facts(model_path: str | Path, dtype: str) -> tuple[ModelDims, int, int, int]:
    """(dims, dtype bytes, max positions, vocab size) from a checkpoint's config.json."""
    from transformers import AutoConfig

    from seesaw_ds.model.loader import model_dims

    config = AutoConfig.from_pretrained(model_path)
    name = job_dtype(model_path, dtype)
    return model_dims(config), DTYPE_BYTES[name], int(config.max_position_embeddings), int(config.vocab_size)


def workload_from_input(input_path: str | Path, model_path: str | Path, *, job_sampling: dict, max_model_len: int,
                        vocab_size: int, sample_lines: int = 256) -> Workload:
    """Prompt lengths and max_tokens of the first ``sample_lines`` valid requests of the input file, read
    exactly as the job reads them (tokenizer, chat template, sampling defaults)."""
    from transformers import AutoTokenizer

    from seesaw_ds.engine.requests import Request, iter_requests
    from seesaw_ds.model.loader import read_generation_defaults

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    stream = iter_requests(input_path, tokenizer, job_sampling=job_sampling,
                           model_defaults=read_generation_defaults(Path(model_path)), max_model_len=max_model_len,
                           vocab_size=vocab_size)
    prompts, outputs = [], []
    for item in stream:
        if isinstance(item, Request):
            prompts.append(len(item.prompt_token_ids))
            outputs.append(item.sampling.max_tokens)
            if len(prompts) >= sample_lines:
                break
    if not prompts:
        raise ValueError(f"io.input={str(input_path)!r} has no valid request for parallel=auto to plan with")
    return Workload(Path(input_path).stem, np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64))


def plan_job(settings, overrides: list[str], *, sample_lines: int = 256, fewer_ranks: bool = False) -> AutoChoice:
    """Calibrate this machine and choose the layouts of ``settings`` (a JobConfig whose model.path and
    io.input are resolved); ValueError with one line when nothing can run. ``fewer_ranks``: the ranks are
    yet to be started, so on a CPU the plan may start fewer of them, each with more threads
    (:func:`rank_counts`; each count calibrated once per machine and kept)."""
    from dataclasses import asdict

    from seesaw_ds.sim.calibration_cache import cached_calibration

    began = time.perf_counter()
    dims, dtype_bytes, max_positions, vocab = checkpoint_facts(settings.model.path, settings.model.dtype)
    sampling = {k: v for k, v in asdict(settings.sampling).items() if v is not None}
    workload = workload_from_input(settings.io.input, settings.model.path, job_sampling=sampling,
                                   max_model_len=settings.model.max_model_len or max_positions, vocab_size=vocab,
                                   sample_lines=sample_lines)
    read_s = time.perf_counter() - began
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    fixed = fixed_layouts(overrides)
    facts = JobFacts(num_ranks=settings.launch.nproc, dtype_bytes=dtype_bytes, block_size=settings.kv.block_size,
                     max_prefill_tokens=settings.scheduler.max_prefill_tokens,
                     low_watermark=settings.scheduler.low_watermark, host_tokens=settings.kv.host_tokens,
                     host_memory_fraction=settings.kv.host_memory_fraction, fixed_prefill=fixed["prefill"],
                     fixed_decode=fixed["decode"],
                     device_tokens=settings.kv.device_tokens if "kv.device_tokens" in keys else None,
                     max_decode_seqs=(settings.scheduler.max_decode_seqs
                                      if "scheduler.max_decode_seqs" in keys else None),
                     prefill_micro_batches=settings.parallel.prefill_micro_batches)
    calibrate_began = time.perf_counter()
    dtype = job_dtype(settings.model.path, settings.model.dtype)

    def calibrate(ranks: int, refresh: bool = settings.parallel.recalibrate):
        return cached_calibration(ranks=ranks, dtype=dtype, model_path=settings.model.path, refresh=refresh)
    found = {facts.num_ranks: calibrate(facts.num_ranks)}
    if fewer_ranks and found[facts.num_ranks][0].device == "cpu":
        fixed_ranks = {layout.num_ranks for layout in (facts.fixed_prefill, facts.fixed_decode) if layout}
        for ranks in rank_counts(facts.num_ranks)[1:]:
            if fixed_ranks <= {ranks}:  # a layout the user gave must have this many ranks
                found[ranks] = calibrate(ranks)
        if len({kept for _, _, kept in found.values()}) > 1:
            # Rank counts are compared through their calibrations: like with like, never figures kept from a
            # quiet start against ones measured under load now. The kept ones are measured again.
            found = {ranks: calibrate(ranks, refresh=True) if kept else (figures, path, kept)
                     for ranks, (figures, path, kept) in found.items()}
    calibration = found[facts.num_ranks][0]
    fewer = [figures for ranks, (figures, _, _) in found.items() if ranks != facts.num_ranks]
    choice = choose(facts, calibration, dims, workload, usable=family_usable(settings.model.path), fewer=fewer)
    _, chosen_file, cached = found[choice.prefill.num_ranks]
    choice.hardware.update(calibration_file=str(chosen_file), calibration_cached=cached)
    choice.timings.update(read_input=read_s, calibrate=time.perf_counter() - calibrate_began,
                          total=time.perf_counter() - began)
    return choice


def write_plan(choice: AutoChoice, run_dir: Path, rank_overrides: list[str]) -> Path:
    """``plan.json`` in the run directory: the choice, its prediction and the overrides the ranks got."""
    path = Path(run_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**choice.to_json(), "rank_overrides": rank_overrides}, indent=2) + "\n")
    return path
