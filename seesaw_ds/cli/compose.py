"""The job's settings from the command line: conf/ composed with the overrides into plain dataclasses
(``compose_settings``), the run directory, and what can be checked before any rank starts."""
from __future__ import annotations

import time
from pathlib import Path

from seesaw_ds.cli.errors import ConfigError, one_line_error


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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
    if str(settings.model.compile).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"model.compile={settings.model.compile!r}: expected auto, true or false")
    if str(settings.model.cuda_graphs).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"model.cuda_graphs={settings.model.cuda_graphs!r}: expected auto, true or false")
    return settings, cfg


def run_dir_for(settings) -> Path:
    """The run directory: run_dir if set, else runs/<date>/<time> under the current directory."""
    if settings.run_dir:
        return Path(settings.run_dir)
    return Path("runs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def check_before_launch(settings) -> None:
    """What can be checked before any rank starts: the model directory and the layouts against it
    (ValueError naming the value and the fix)."""
    from seesaw_ds.cli.passed_checks import check_digest, passed_before, remember_pass
    from seesaw_ds.model.loader import parse_dtype

    check_sampling(settings)
    parse_dtype(settings.model.dtype, None)  # the name alone: ranks would refuse it only after starting
    if settings.kv.prefix_window_tokens < 1:
        raise ValueError(f"kv.prefix_window_tokens={settings.kv.prefix_window_tokens} must be >= 1 (prompt tokens "
                         "read ahead, at least scheduler.max_prefill_tokens are)")
    if settings.kv.prefix_min_tokens < 1 or (settings.kv.prefix_cache_tokens or 0) < 0:
        raise ValueError(f"kv.prefix_min_tokens={settings.kv.prefix_min_tokens} must be >= 1 and "
                         f"kv.prefix_cache_tokens={settings.kv.prefix_cache_tokens} >= 0 (or null: a quarter of "
                         "the staging area)")
    if settings.parallel.prefill_micro_batches < 1:
        raise ValueError(f"parallel.prefill_micro_batches={settings.parallel.prefill_micro_batches} must be >= 1 "
                         "(micro-batches per pipeline stage in a prefill step; 8 is the default)")
    if settings.model.path is not None:
        # Checks that passed for the same model files, layouts and code are not run again (passed_checks.py).
        digest = check_digest(settings) if Path(settings.model.path).expanduser().is_dir() else None
        if digest is None or not passed_before(digest):
            from seesaw_ds.config import layout_of
            from seesaw_ds.model.loader import open_checkpoint
            from seesaw_ds.model.template import check_weights, validate_model_layouts

            checkpoint = open_checkpoint(settings.model.path, trust_remote_code=settings.model.trust_remote_code)
            layouts = {"prefill": layout_of(settings.parallel.prefill), "decode": layout_of(settings.parallel.decode)}
            if not settings.parallel.auto:  # parallel=auto: the planner picks (and checks) them before launch
                validate_model_layouts(checkpoint, layouts, settings.launch.nproc)
            check_weights(checkpoint)
            if digest is not None:
                remember_pass(digest)
    check_io_paths(settings)


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

    from seesaw_ds.engine.params import resolve_sampling

    job = {key: value for key, value in asdict(settings.sampling).items() if value is not None and key != "seed"}
    resolve_sampling(model_defaults or {}, job, {})
