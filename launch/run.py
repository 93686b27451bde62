"""seesaw_ds job entry point (Hydra app).

    python launch/run.py [overrides]          one job; starts `mpiexec -n launch.nproc` on itself
    python launch/run.py -m a=1,2 [overrides] a Hydra multirun sweep, each job its own multi-rank run
    python launch/run.py parallel=auto ...     the planner picks the layouts for this machine (plan.json in the run dir)
    srun --mpi=pmi2 python launch/run.py ...   under Slurm/mpiexec: every rank runs the job

Outside a launcher, this process only checks the configuration, decides the run directory (once, so all
ranks agree) and starts the ranks. Under a launcher, every rank composes the same configuration and runs.
Exit codes: 0 done, 2 bad configuration or input (one line on stderr), other non-zero: a failed run.
"""
from __future__ import annotations

import gc

# Start-up (torch, transformers, DeepSpeed, the model) creates ~400,000 long-lived objects, and the cyclic
# collector traverses them again and again while they are made: ~0.6 s of a 3.3 s import per process on the
# 2-core AMD box. Off until start-up is over; seesaw_ds.cli.rank.startup_over() collects once and turns it
# back on.
gc.disable()

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from seesaw_ds.cli import (CONF_DIR, ConfigError, check_before_launch, compose_settings, fail,  # noqa: E402
                           EXIT_PREEMPTED, resolve_default_model, resolve_parallel_auto, run_dir_for,
                           startup_over, summarize_sweep, worker_main)
from seesaw_ds.sim.auto import write_plan  # noqa: E402
from seesaw_ds.distributed.env import (NODE_CPUS_VAR, cpu_affinity, mpiexec_binding,  # noqa: E402
                                       physical_cores, rank_environment, under_launcher)


def launch_ranks(overrides: list[str], run_dir: Path, launch) -> int:
    """Start ``launch.nproc`` ranks of this script under ``launch.mpiexec``; returns their exit code."""
    startup_over()
    mpiexec = launch.mpiexec
    launcher = mpiexec if os.sep in mpiexec else str(Path(sys.executable).parent / mpiexec)
    if not Path(launcher).exists():
        launcher = mpiexec
    cpus = cpu_affinity()
    binding = mpiexec_binding(launch.bind, launch.nproc, physical_cores(cpus))
    command = [launcher, "-n", str(launch.nproc), *binding,
               sys.executable, str(Path(__file__).resolve()), *overrides,
               f"+run_dir={run_dir}" if not any(o.startswith(("run_dir=", "+run_dir=")) for o in overrides)
               else ""]
    command = [part for part in command if part]
    env = rank_environment(dict(os.environ, SEESAW_RUN_DIR=str(run_dir)), hugepages=launch.hugepages,
                           oversubscribed=launch.nproc > len(cpus))
    env.setdefault(NODE_CPUS_VAR, str(len(cpus)))  # a bound rank sees only its own cores; threads need the whole
    process = subprocess.Popen(command, env=env)
    # Pass preemption signals on to the ranks (mpiexec forwards them), so they stop cleanly. MPICH's mpiexec
    # does not forward USR2 (submitit's warning signal; it ends with 244): send it on as USR1, which the ranks
    # treat the same way.
    forward = lambda signum, _frame: process.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR2 else signum)
    forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    previous = {signum: signal.signal(signum, forward) for signum in forwarded}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def single(overrides: list[str]) -> int:
    try:
        settings, _ = compose_settings(overrides)
        overrides, settings = resolve_default_model(overrides, settings)
        check_before_launch(settings)
        mpiexec_binding(settings.launch.bind, settings.launch.nproc, [])  # ValueError for an unknown launch.bind
        rank_overrides, plan = auto_overrides(overrides, settings)
        if plan is not None:
            settings, _ = compose_settings(rank_overrides)
            check_before_launch(settings)
    except (ConfigError, ValueError) as error:
        fail(str(error))
    run_dir = run_dir_for(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
    if plan is not None:
        print(f"seesaw_ds: {plan.line()}; {write_plan(plan, run_dir, rank_overrides)}", flush=True)
    return launch_ranks(rank_overrides, run_dir, settings.launch)


def auto_overrides(overrides: list[str], settings) -> tuple[list[str], object]:
    """``parallel=auto``: plan once, here, before any rank starts, and give the ranks explicit layouts
    (seesaw_ds/sim/auto.py); otherwise ``overrides`` unchanged and no plan."""
    if not settings.parallel.auto:
        return overrides, None
    return resolve_parallel_auto(overrides, settings)


# -- Hydra app: multirun sweeps and Hydra's own flags (--cfg, --info, --help) -----------------------------------
HYDRA_FLAGS = frozenset({"-m", "--multirun", "--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help",
                         "--resolve", "--package", "-p", "--shell-completion", "-sc", "--version"})
SAFE_VALUE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:@%~")


def wants_hydra(argv: list[str]) -> bool:
    """A multirun, or one of Hydra's own flags: handled by Hydra's app rather than the one-job launcher."""
    return any(arg.split("=", 1)[0] in HYDRA_FLAGS for arg in argv if arg.startswith("-"))


def override(key: str, value: object) -> str:
    """``key=value`` as a Hydra override, quoting values that Hydra's grammar would split or read."""
    text = str(value)
    if text and set(text) <= SAFE_VALUE_CHARS:
        return f"{key}={text}"
    return "{}='{}'".format(key, text.replace("\\", "\\\\").replace("'", "\\'"))


def without(overrides: list[str], *keys: str) -> list[str]:
    """``overrides`` less any that set one of ``keys`` (with or without +/++)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys]


def plan_sweep(overrides: list[str]) -> tuple[Path, list[str]]:
    """Before any job starts: the sweep directory (resolved once, so that this process knows where the jobs
    write) and the overrides Hydra gets; every job is checked like a single run first (exit 2 with one line
    naming the job on the first that cannot run)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from seesaw_ds.cli import one_line_error
    from seesaw_ds.config import register

    register()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), job_name=Path(__file__).stem, version_base=None):
            hydra_cfg = compose(config_name="config", overrides=hydra_overrides, return_hydra_config=True).hydra
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        launcher = hydra_cfg.launcher
        batches = BasicSweeper.split_arguments([o for o in parsed if not o.is_hydra_override()], None)
    except Exception as error:  # noqa: BLE001 - Hydra raises many types; all are config errors
        fail(one_line_error(error))
    finally:
        GlobalHydra.instance().clear()
    jobs = [job for batch in batches for job in batch]
    # Under Slurm (submitit) the launcher preset decides how many ranks a job gets: nodes * tasks_per_node.
    extra: list[str] = []
    slurm_ranks = (launcher.nodes * launcher.tasks_per_node
                   if str(launcher.get("_target_", "")).endswith(".SlurmLauncher") else None)
    if slurm_ranks is not None and not any(o.split("=", 1)[0].lstrip("+") == "launch.nproc" for o in overrides):
        extra = [f"launch.nproc={slurm_ranks}"]
    common = set.intersection(*(set(job) for job in jobs)) if len(jobs) > 1 else set()
    files: dict[str, set] = {"io.output": set(), "io.metrics": set()}
    for number, job in enumerate(jobs):
        try:
            # ${hydra:...} (e.g. io.output=${hydra:runtime.output_dir}/out.jsonl) only resolves inside a job
            job_overrides = [o for o in job if "${hydra:" not in o.replace("\\", "")] + extra
            settings, _ = compose_settings(job_overrides)
            if slurm_ranks is not None and settings.launch.nproc != slurm_ranks:
                raise ConfigError(f"launch.nproc={settings.launch.nproc} but hydra/launcher starts "
                                  f"nodes*tasks_per_node={slurm_ranks} ranks per job; drop launch.nproc or "
                                  f"size the launcher for it")
            settings = resolve_default_model(job_overrides, settings)[1]  # fetched once here; each job re-checks
            check_before_launch(settings)
            mpiexec_binding(settings.launch.bind, settings.launch.nproc, [])  # an unknown launch.bind
        except (ConfigError, ValueError) as error:
            varying = " ".join(o for o in job if o not in common)
            fail(f"sweep job {number}{f' ({varying})' if varying else ''}: {error}")
        files["io.output"].add(settings.io.output)
        files["io.metrics"].add(settings.io.metrics)
    for key, values in files.items():
        if len(jobs) > 1 and len(values) == 1 and None not in values:
            fail(f"{key}={values.pop()!r} is the same file for every sweep job (each would resume or overwrite "
                 f"the last one's); leave it unset: each job then writes into its own directory")
    hydra_argv = without(overrides, "hydra.sweep.dir") + extra + [override("hydra.sweep.dir", sweep_dir)]
    return sweep_dir, hydra_argv


def sweep_job(cfg) -> int:
    """Hydra's task function for one sweep job. In this (outer) process it starts the job's ranks with
    mpiexec; inside a Slurm step (submitit's srun started one task per rank) it runs as one of the ranks."""
    from hydra.core.hydra_config import HydraConfig

    from seesaw_ds.config import to_settings

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    task_overrides = list(hydra_cfg.overrides.task)
    settings = to_settings(cfg)  # resolves ${hydra:...} and ${oc.env:...} here, where they are defined
    # Every job writes into its own directory (where the sweep summary looks), unless told otherwise.
    files = {"io.output": settings.io.output or job_dir / "outputs.jsonl",
             "io.metrics": settings.io.metrics or job_dir / "outputs.metrics.json"}
    rank_overrides = without(task_overrides, *files, "run_dir") + [override(k, v) for k, v in files.items()]
    rank_overrides.append(override("+run_dir", job_dir))
    if under_launcher():
        return run_as_rank(rank_overrides, task_overrides, job_dir, settings.launch.nproc)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "overrides.txt").write_text("".join(f"{o}\n" for o in task_overrides))
    rank_overrides, settings = resolve_default_model(rank_overrides, settings)
    rank_overrides, plan = auto_overrides(rank_overrides, settings)
    launch = settings.launch
    if plan is not None:
        print(f"seesaw_ds: {plan.line()}; {write_plan(plan, job_dir, rank_overrides)}", flush=True)
        if plan.launch_nproc is not None:  # fewer ranks than launch.nproc, each with more threads
            launch = replace(launch, nproc=plan.launch_nproc)
    code = launch_ranks(rank_overrides, job_dir, launch)
    if code != 0:
        raise RuntimeError(f"sweep job {hydra_cfg.job.num} ({' '.join(task_overrides)}) exited with {code}; "
                           f"its files: {job_dir}")
    return code


def run_as_rank(rank_overrides: list[str], task_overrides: list[str], job_dir: Path, nproc: int) -> int:
    """One rank of a sweep job whose tasks srun started (hydra/launcher=slurm*): srun must have made them
    the ranks of one MPI job (--mpi=pmi2), or each task would run the whole job on its own."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != nproc:
        raise RuntimeError(f"srun started the job's tasks but MPI sees {world.Get_size()} rank(s), not "
                           f"launch.nproc={nproc}: add srun_args: [--mpi=pmi2] (or pmix) to the hydra/launcher preset")
    if world.Get_rank() == 0:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "overrides.txt").write_text("".join(f"{o}\n" for o in task_overrides))
    try:
        code = worker_main(rank_overrides)
    except SystemExit as stop:  # a config or input error (one line already printed): a failed job, not a lost one
        code = stop.code if isinstance(stop.code, int) else 1
    if code == EXIT_PREEMPTED:
        # Stopped by a signal (scontrol requeue, preemption, submitit's USR2) and requeued: leave as SystemExit,
        # which submitit does not record as the job's result, so the requeued job runs this task again.
        sys.exit(code)
    if code:
        raise RuntimeError(f"sweep job in {job_dir} exited with {code}")
    return code


def hydra_app(argv: list[str]) -> int:
    """Run Hydra's app: a multirun sweep (each job its own multi-rank run, then a summary of all of them in
    the sweep directory), or what Hydra's flags ask for (--cfg job, --info, --help)."""
    import hydra
    from hydra._internal.utils import get_args_parser

    from seesaw_ds.config import register

    register()
    args = get_args_parser().parse_args(argv)
    sweeping = args.multirun and not (args.cfg or args.info or args.help or args.hydra_help or args.shell_completion)
    sweep_dir = None
    if sweeping:
        sweep_dir, overrides = plan_sweep(args.overrides)
        flags = [arg for arg in argv if arg not in args.overrides]
        argv = [*flags, *overrides]
    elif not args.multirun:  # --cfg/--info of one job: its config errors in one line, like a run's
        try:
            compose_settings([o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))])
        except ConfigError as error:
            fail(str(error))
    sys.argv = [sys.argv[0], *argv]
    code = 0
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(sweep_job)()
    except SystemExit as stop:  # Hydra exits 1 when a job failed; the others have run: summarize them all
        code = stop.code if isinstance(stop.code, int) else 1
    if sweep_dir is not None:
        summary = summarize_sweep(sweep_dir)
        if summary is None:
            print(f"seesaw_ds: no job of the sweep in {sweep_dir} wrote metrics", file=sys.stderr, flush=True)
            code = code or 1
        elif code == 0 and any(row["status"] != "ok" for row in summary):
            code = 1
    return code


def main() -> int:
    argv = sys.argv[1:]
    if under_launcher():
        return worker_main(argv)
    if wants_hydra(argv):
        return hydra_app(argv)
    return single(argv)


if __name__ == "__main__":
    sys.exit(main())
