"""seesaw_ds job entry point (Hydra app).

    python launch/run.py [overrides]          one job; starts `mpiexec -n launch.nproc` on itself
    python launch/run.py -m a=1,2 [overrides] a Hydra multirun sweep, each job its own multi-rank run
    srun --mpi=pmi2 python launch/run.py ...   under Slurm/mpiexec: every rank runs the job

Outside a launcher, this process only checks the configuration, decides the run directory (once, so all
ranks agree) and starts the ranks. Under a launcher, every rank composes the same configuration and runs.
Exit codes: 0 done, 2 bad configuration or input (one line on stderr), other non-zero: a failed run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from seesaw_ds.cli import (CONF_DIR, ConfigError, compose_settings, fail, run_dir_for,  # noqa: E402
                           summarize_sweep, worker_main)
from seesaw_ds.dist.env import under_launcher  # noqa: E402


def launch_ranks(overrides: list[str], run_dir: Path, nproc: int, mpiexec: str) -> int:
    """Start ``nproc`` ranks of this script under mpiexec; returns their exit code."""
    launcher = mpiexec if os.sep in mpiexec else str(Path(sys.executable).parent / mpiexec)
    if not Path(launcher).exists():
        launcher = mpiexec
    command = [launcher, "-n", str(nproc), sys.executable, str(Path(__file__).resolve()), *overrides,
               f"+run_dir={run_dir}" if not any(o.startswith(("run_dir=", "+run_dir=")) for o in overrides)
               else ""]
    command = [part for part in command if part]
    env = dict(os.environ, SEESAW_RUN_DIR=str(run_dir))
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(command, env=env)


def single(overrides: list[str]) -> int:
    try:
        settings, _ = compose_settings(overrides)
    except ConfigError as error:
        fail(str(error))
    run_dir = run_dir_for(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
    return launch_ranks(overrides, run_dir, settings.launch.nproc, settings.launch.mpiexec)


def multirun(argv: list[str]) -> int:
    """Hydra multirun: each job is checked, then launched as its own multi-rank run."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from seesaw_ds.config import register, to_settings

    register()
    codes: list[int] = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def job(cfg) -> float:
        try:
            settings = to_settings(cfg)
        except Exception as error:  # noqa: BLE001 - reported as a config error
            fail(str(error).splitlines()[0])
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        task_overrides = list(HydraConfig.get().overrides.task)
        if not any(o.startswith(("io.output=", "+io.output=")) for o in task_overrides):
            task_overrides.append(f"io.output={run_dir / 'outputs.jsonl'}")
        code = launch_ranks(task_overrides, run_dir, settings.launch.nproc, settings.launch.mpiexec)
        codes.append(code)
        if code != 0:
            raise RuntimeError(f"job in {run_dir} exited with {code}")
        return 0.0

    sys.argv = [sys.argv[0], *argv]
    job()
    summarize_sweep(Path.cwd())
    return max(codes, default=0)


def main() -> int:
    argv = sys.argv[1:]
    if under_launcher():
        return worker_main(argv)
    if "-m" in argv or "--multirun" in argv:
        return multirun(argv)
    return single(argv)


if __name__ == "__main__":
    sys.exit(main())
