"""seesaw_ds planner (Hydra app): predict the best (prefill, decode) layout pair by simulation.

    python launch/plan.py planner.gpu=a10 planner.num_gpus=8 planner.model=codellama_34b \
        planner.workload=arxiv planner.output=plan.json
    python launch/plan.py -m planner.gpu=a10,l4 planner.workload=sharegpt,arxiv    a Hydra multirun sweep

Config: conf/planner/config.yaml (keys and units: seesaw_ds/sim/presets.py); presets in conf/planner/gpu/,
model/ and workload/ are picked by name. Exit codes: 0 done, 2 bad configuration or preset (one line on
stderr).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from seesaw_ds.cli import fail, one_line_error  # noqa: E402
from seesaw_ds.sim.presets import PLANNER_CONF_DIR, PlannerConfig, register  # noqa: E402

def _plan(planner: PlannerConfig) -> dict:
    from seesaw_ds.sim.app import run_planner

    try:
        return run_planner(planner)
    except ValueError as error:  # PresetError and every user-facing check are ValueErrors
        fail(one_line_error(error))


def single(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register()
    try:
        with initialize_config_dir(config_dir=str(PLANNER_CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        planner = OmegaConf.to_object(cfg.planner)
    except Exception as error:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all are config errors
        fail(one_line_error(error))
    _plan(planner)
    return 0


def multirun(argv: list[str]) -> int:
    import hydra
    from omegaconf import OmegaConf

    register()

    @hydra.main(config_path=str(PLANNER_CONF_DIR), config_name="config", version_base=None)
    def job(cfg) -> float:
        from hydra.core.hydra_config import HydraConfig

        planner = OmegaConf.to_object(cfg.planner)
        if planner.output is None:  # each sweep job keeps its plan in its own directory
            planner.output = str(Path(HydraConfig.get().runtime.output_dir) / "plan.json")
        plan = _plan(planner)
        return float(plan["speedup"] or 0.0)

    sys.argv = [sys.argv[0], *argv]
    job()
    return 0


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if any(a in ("-m", "--multirun") for a in argv):
        return multirun(argv)
    return single(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
