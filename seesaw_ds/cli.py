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

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DATA_DIR = Path(__file__).resolve().parent / "data"
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the value and the fix."""


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    """Print one line to stderr and exit (no traceback)."""
    print(f"seesaw_ds: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # OmegaConf puts the useful part first and "full_key: ..." details after it.
    detail = next((line for line in lines[1:] if line.startswith("full_key:")), "")
    return f"{lines[0]} ({detail})" if detail and detail not in lines[0] else lines[0]


def compose_settings(overrides: list[str]):
    """Compose conf/config.yaml with ``overrides`` into plain settings; ConfigError on any problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from seesaw_ds.config import register, to_settings

    register()
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        settings = to_settings(cfg)
    except Exception as error:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all are config errors
        raise ConfigError(_first_line(error)) from None
    if settings.launch.nproc < 1:
        raise ConfigError(f"launch.nproc={settings.launch.nproc} must be >= 1")
    return settings, cfg


def run_dir_for(settings) -> Path:
    """The run directory: run_dir if set, else runs/<date>/<time> under the current directory."""
    if settings.run_dir:
        return Path(settings.run_dir)
    return Path("runs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def _preflight(settings) -> str | None:
    """Checks of the files a job touches (rank 0); the error message or None."""
    if not Path(settings.io.input).is_file():
        return f"io.input={settings.io.input!r} does not exist; give a JSONL file of requests"
    output = Path(settings.io.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "ab"):
            pass
    except OSError as error:
        return f"io.output={str(output)!r} cannot be written ({error.strerror}); choose a writable path"
    return None


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
    settings.run_dir = world.bcast(settings.run_dir or os.environ.get("SEESAW_RUN_DIR")
                                   or str(run_dir_for(settings)) if rank == 0 else None, root=0)
    run_dir = Path(settings.run_dir)
    if settings.io.input is None:
        settings.io.input = str(DATA_DIR / "sample_prompts.jsonl")
    if settings.io.output is None:
        settings.io.output = str(run_dir / "outputs.jsonl")
    if settings.model.path is None:
        from seesaw_ds.model.tiny import default_model_dir, ensure_default_model

        cache = Path(os.environ.get("SEESAW_CACHE", Path.home() / ".cache" / "seesaw_ds"))
        if rank == 0:
            ensure_default_model(cache)
        world.Barrier()
        settings.model.path = str(default_model_dir(cache))
    agree(_preflight(settings) if rank == 0 else None)
    try:
        return _run(settings, run_dir, agree)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - any failure must end every rank, never leave them hanging
        traceback.print_exc()
        sys.stderr.flush()
        world.Abort(1)
        return 1


def _run(settings, run_dir: Path, agree) -> int:
    from seesaw_ds import runtime as runtime_mod
    from seesaw_ds.engine.engine import layouts_of, make_staging_factory, run_job

    runtime = None
    try:
        runtime = runtime_mod.start(
            settings.model.path, layouts_of(settings), device_tokens=settings.kv.device_tokens,
            block_size=settings.kv.block_size, ranks_per_node=settings.launch.ranks_per_node,
            dtype=settings.model.dtype, allow_pickle=settings.model.allow_pickle,
            trust_remote_code=settings.model.trust_remote_code, comm_timeout_s=settings.launch.comm_timeout_s,
            staging_factory=make_staging_factory(settings))
        error = None
    except ValueError as start_error:
        error = str(start_error)
    agree(error)
    run_job(settings, runtime, run_dir)
    runtime.close()
    return 0


def summarize_sweep(sweep_dir: Path) -> Path | None:
    """A Markdown and CSV table of every job's throughput and transitions under a multirun directory."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/outputs.metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        overrides_file = metrics_file.parent / "overrides.txt"
        overrides = overrides_file.read_text().split() if overrides_file.exists() else []
        rows.append({"job": metrics_file.parent.name, "overrides": " ".join(overrides),
                     "requests": metrics["num_requests"],
                     "output_tok_s": round(metrics["output_tokens_per_second"], 2),
                     "total_tok_s": round(metrics["tokens_per_second"], 2),
                     "transitions": metrics["num_transitions"],
                     "transition_s": round(metrics["transition_seconds"], 3),
                     "elapsed_s": round(metrics["elapsed_time"], 2)})
    if not rows:
        return None
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in rows)
    (sweep_dir / "summary.md").write_text(header + body)
    print(header + body, flush=True)
    return sweep_dir / "summary.md"
