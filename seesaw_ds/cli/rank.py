"""A rank's main (``worker_main``, what every rank runs under mpiexec/srun): settings agreed on by every
rank (any error ends them all with one line), the default model and parallel=auto resolved on rank 0 when
no launcher did, checks of the job's files, then start-up and the job."""
from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from pathlib import Path

from seesaw_ds import faults
from seesaw_ds.cli.answers import print_answers
from seesaw_ds.cli.auto import resolve_parallel_auto
from seesaw_ds.cli.compose import check_io_paths, check_sampling, compose_settings, run_dir_for
from seesaw_ds.cli.errors import EXIT_CONFIG, ConfigError
from seesaw_ds.cli.models import cache_dir, default_input, is_default_model, resolve_default_model
from seesaw_ds.cli.signals import EXIT_PREEMPTED, StopRequest, requeue_if_slurm


def startup_over() -> None:
    """The end of a process's start-up (launch/run.py turns the cyclic collector off while it imports): one
    collection, and the collector on again. (Not gc.freeze(): frozen objects outlive the interpreter's final
    collection, and Triton's nanobind bindings then print hundreds of "leaked" lines at every rank's exit.)"""
    if not gc.isenabled():
        gc.collect()
        gc.enable()


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

    from seesaw_ds.distributed.waits import settle

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[seesaw_ds r{rank}] %(levelname)s %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def agree(error: str | None) -> None:
        settle(world)  # rank 0 may be reading files meanwhile
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
            cpu_prepack=settings.model.cpu_prepack, compile=settings.model.compile,
            cuda_graphs=settings.model.cuda_graphs)
        error = None
    except ValueError as start_error:
        error = str(start_error)
    agree(error)
    startup_over()
    result = run_job(settings, runtime, run_dir, stop=stop)
    runtime.close()
    if result.preempted:
        requeue_if_slurm(stop)
        return EXIT_PREEMPTED
    return 0
