"""Load check: does rank 0's memory stay bounded as the input grows? (`python launch/load.py`)

Runs the real job (``launch/run.py``, ``model=tiny`` unless ``model.path`` is overridden) on synthetic
N-line inputs of short prompts with ``sampling.max_tokens=1``, so that almost all the work is reading,
tokenizing, scheduling and writing requests, and reports the peak RSS of global rank 0 (from the job's
metrics file) and its growth per request against the smallest input. Memory bounded by the work in flight
shows as a growth of a few bytes per request (the per-id duplicate/resume index); holding every request
would show as kilobytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
RUN = REPO / "launch" / "run.py"
DEFAULT_SIZES = (1_000, 10_000, 100_000)


@dataclass
class LoadPoint:
    """One job of the load check."""

    num_lines: int
    """Input lines (all valid, all answered)."""
    peak_rss_bytes: int
    """Peak resident memory of global rank 0 over the whole job (metrics: peak_rss_bytes_rank0)."""
    wall_seconds: float
    """The job's wall time, start-up included."""
    num_requests: int
    """Requests answered (== num_lines when the job did them all)."""


def write_input(path: Path, num_lines: int) -> Path:
    """`num_lines` short plain prompts with unique custom_ids (~80 bytes a line)."""
    with open(path, "w", encoding="utf-8") as out:
        for index in range(num_lines):
            out.write(json.dumps({"custom_id": f"request-{index:07d}",
                                  "prompt": f"Tell me about item number {index}."}) + "\n")
    return path


def run_point(num_lines: int, work_dir: Path, overrides: list[str] = (), *, timeout: float = 3600) -> LoadPoint:
    """Run one job on a fresh `num_lines`-line input in `work_dir`; raises RuntimeError if it fails."""
    work_dir.mkdir(parents=True, exist_ok=True)
    input_path = write_input(work_dir / f"in{num_lines}.jsonl", num_lines)
    output = work_dir / f"out{num_lines}.jsonl"
    for stale in work_dir.glob(f"out{num_lines}.*"):
        stale.unlink()
    command = [sys.executable, str(RUN), "model=tiny", f"io.input={input_path}", f"io.output={output}",
               "sampling.max_tokens=1", "io.progress_interval_s=100000", f"run_dir={work_dir / 'run'}",
               *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("SEESAW_CACHE", str(REPO / ".cache"))
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=work_dir)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"job on {num_lines} lines exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    return LoadPoint(num_lines, metrics["peak_rss_bytes_rank0"], wall, metrics["num_requests"])


def growth_per_request(small: LoadPoint, large: LoadPoint) -> float:
    """Bytes of rank-0 peak RSS per extra request between two points."""
    return (large.peak_rss_bytes - small.peak_rss_bytes) / (large.num_lines - small.num_lines)


def table(points: list[LoadPoint]) -> str:
    """A markdown table: lines, peak RSS, growth per request against the first point, wall time."""
    rows = ["| input lines | rank-0 peak RSS (MiB) | growth per request vs first (bytes) | wall (s) |",
            "|---:|---:|---:|---:|"]
    for point in points:
        growth = "-" if point is points[0] else f"{growth_per_request(points[0], point):.0f}"
        rows.append(f"| {point.num_lines:,} | {point.peak_rss_bytes / 2**20:.0f} | {growth} | "
                    f"{point.wall_seconds:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Anything after -- is passed to launch/run.py as Hydra overrides.")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated input sizes in lines (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where inputs and outputs go (default: a "
                        "temporary directory, removed afterwards)")
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    sizes = sorted(int(size) for size in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="seesaw-load-") as scratch:
        work_dir = args.work_dir or Path(scratch)
        points = []
        for size in sizes:
            points.append(run_point(size, work_dir, overrides))
            print(f"{size} lines: peak RSS {points[-1].peak_rss_bytes / 2**20:.0f} MiB, "
                  f"{points[-1].wall_seconds:.0f} s", flush=True)
    print(table(points))
    return 0
