"""A multirun's summary: every job side by side (summary.md, summary.csv, summary.png in the sweep directory)."""
from __future__ import annotations

import csv
import json
from pathlib import Path


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
