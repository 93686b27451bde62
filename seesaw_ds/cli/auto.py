"""``parallel=auto`` before launch: calibrate this machine and plan the job's layouts (seesaw_ds/sim/auto.py),
returned as the explicit overrides every rank gets."""
from __future__ import annotations

from seesaw_ds.cli.compose import check_io_paths
from seesaw_ds.cli.errors import ConfigError, one_line_error
from seesaw_ds.cli.models import cache_dir, default_input


def resolve_parallel_auto(overrides: list[str], settings) -> tuple[list[str], object]:
    """``parallel=auto``: calibrate this machine, plan the job's layouts (seesaw_ds/sim/auto.py) and return
    the explicit overrides every rank gets instead, with the choice; ConfigError (one line) when nothing fits.
    The default model and input are resolved as a rank resolves them. With ``parallel.auto_fewer_ranks``,
    before mpiexec starts the ranks, the plan may start fewer of them (each with more threads, ``launch.nproc``
    among the overrides); once srun or mpiexec has started them (rank 0 plans), it plans for all of them."""
    from copy import deepcopy

    from seesaw_ds.distributed.env import under_launcher
    from seesaw_ds.sim.auto import plan_job

    job = deepcopy(settings)
    job.io.input = job.io.input or str(default_input(job))
    if job.model.path is None:
        from seesaw_ds.model.tiny import ensure_default_model

        job.model.path = str(ensure_default_model(cache_dir()))
    check_io_paths(job)
    try:
        choice = plan_job(job, overrides, fewer_ranks=job.parallel.auto_fewer_ranks and not under_launcher())
    except ValueError as error:
        raise ConfigError(one_line_error(error)) from None
    return choice.overrides(overrides), choice
