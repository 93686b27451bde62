"""The command line: the pieces the entry points (launch/run.py, launch/plan.py, launch/fetch_model.py) and a
rank's main are made of, one concern a module, each importing only what it uses (Hydra, MPI, torch lazily):

- ``errors``: a configuration that cannot run is one line naming the value and the fix (``ConfigError``,
  ``fail``, ``one_line_error``; exit 2);
- ``compose``: conf/ composed with the overrides into plain settings, the run directory, and the checks
  that need no rank (layouts against the model, sampling defaults, the job's files);
- ``models``: the default model (SmolLM2, fetched into the cache once; the tiny model where it cannot be
  had) and the bundled input; ``auto``: ``parallel=auto`` planned before launch;
- ``rank``: ``worker_main``, what every rank runs under mpiexec/srun, and ``startup_over`` (the cyclic
  collector, off while a process starts, on again);
- ``signals``: SIGTERM/SIGUSR1/SIGUSR2 stop the job on a step boundary, and a warning signal requeues it;
- ``answers``: the first answers of a job on the bundled input, printed; ``sweep``: a multirun's summary.

The names below are the package's interface; modules inside it import each other, never this file.
"""
from seesaw_ds.cli.answers import print_answers
from seesaw_ds.cli.auto import resolve_parallel_auto
from seesaw_ds.cli.compose import (CONF_DIR, check_before_launch, check_io_paths, check_sampling,
                                   complete_layout_overrides, compose_settings, run_dir_for)
from seesaw_ds.cli.errors import EXIT_CONFIG, ConfigError, fail, one_line_error
from seesaw_ds.cli.models import DATA_DIR, cache_dir, default_input, is_default_model, resolve_default_model
from seesaw_ds.cli.rank import startup_over, worker_main
from seesaw_ds.cli.signals import EXIT_PREEMPTED, StopRequest, requeue_if_slurm
from seesaw_ds.cli.sweep import summarize_sweep

__all__ = ["CONF_DIR", "DATA_DIR", "EXIT_CONFIG", "EXIT_PREEMPTED", "ConfigError", "StopRequest", "cache_dir",
           "check_before_launch", "check_io_paths", "check_sampling", "complete_layout_overrides",
           "compose_settings", "default_input", "fail", "is_default_model", "one_line_error", "print_answers",
           "requeue_if_slurm", "resolve_default_model", "resolve_parallel_auto", "run_dir_for", "summarize_sweep",
           "startup_over", "worker_main"]
