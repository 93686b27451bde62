"""Where a seesaw_ds run's time goes: py-spy's raw (collapsed-stack) samples of every rank, in buckets.

``bench.profile=true`` runs each seesaw_ds peer under ``py-spy record --subprocesses --idle --format raw``
(py-spy is installed into the project venv on first use; ``--idle`` keeps the samples of a rank blocked in a
receive, so that waiting shows); :func:`summarize` reads the samples of each rank's step loop
(``run_job``, main thread) and charges each sample to the first bucket whose marker occurs in its stack, innermost
frame first, so that e.g. an all-reduce inside a linear layer counts as communication, not as the linear.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

#: (bucket, markers): a sample's innermost frame matching a marker decides its bucket (checked in order).
BUCKETS = (
    ("tp all-reduce", ("inference_all_reduce", "all_reduce")),
    ("pp send/recv (pipeline waits)", ("recv (seesaw_ds/backends", "isend (seesaw_ds/backends")),
    ("kv gather (decode)", ("DeviceKVCache.gather",)),
    ("attention sdpa", ("_decode (", "_prefill (")),
    ("kv writes / staging copies", ("write_slots", "write_sequence", "write_heads", "prefill_sink", "swap_in",
                                    "evict", "StagingArea", "HostKV", "SwapIn", "LayerReady", "DeviceCopies",
                                    "finish_writes", "_load (")),
    ("device cache allocation", ("DeviceKVCache.__init__",)),
    ("linear matmuls", ("LinearLayer.forward", "LinearAllreduce.forward", "Linear.forward")),
    ("sampling", ("sample_next_tokens", "Worker._sample")),
    ("norm / rotary / activation", ("RMSNorm", "rotary", "rotate_half", "apply_rotary", "silu", "act_fn")),
    ("other model python", ("run_layers", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "Executor.forward",
                            "_decode_inputs", "_prefill_inputs", "embed_tokens", "StageModel.head")),
    ("end of job: metrics, timeline plot", ("_plot_timeline", "_metrics (", "_summary (")),
    ("step control (bcast/gather, leader)", ("run_job",)),
)


def profile_command(output: Path, rate: int = 50) -> list[str]:
    """The py-spy prefix that records a command and every process it starts."""
    return [str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses", "--rate", str(rate),
            "--format", "raw", "--idle", "--nonblocking", "-o", str(output), "--"]


def ensure_py_spy() -> str | None:
    """Install py-spy into this venv unless present; None or why it could not be."""
    if (Path(sys.executable).parent / "py-spy").exists():
        return None
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"pip install py-spy failed: {done.stderr.strip()[-200:]}"


def _bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in BUCKETS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def summarize(raw_path: Path, rate: int = 50, within: str = "run_job") -> dict:
    """``{rank pid: {"seconds": total, "buckets": {bucket: seconds}}}`` over samples under ``within``."""
    ranks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in Path(raw_path).read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        processes = [i for i, frame in enumerate(frames) if frame.startswith("process ")]
        if not processes:
            continue
        pid = re.match(r"process (\d+)", frames[processes[-1]]).group(1)
        frames = frames[processes[-1] + 1:]
        if not any(within in frame for frame in frames):
            continue
        # py-spy attributes time spent inside native code to the Python line that called it; keep the
        # thread of the sample (swap-in copies run on a background thread) as is.
        ranks[pid][_bucket(frames)] += int(count)
    return {pid: {"seconds": sum(c.values()) / rate, "buckets": {k: v / rate for k, v in c.most_common()}}
            for pid, c in ranks.items()}


def markdown(summary: dict) -> str:
    """One table: buckets as rows, ranks as columns (seconds and share)."""
    pids = sorted(summary)
    names = [name for name, _ in BUCKETS] + ["other"]
    lines = ["| where | " + " | ".join(f"rank pid {p}" for p in pids) + " |", "|---|" + "---:|" * len(pids)]
    for name in names:
        cells = []
        for pid in pids:
            total = summary[pid]["seconds"] or 1.0
            seconds = summary[pid]["buckets"].get(name, 0.0)
            cells.append(f"{seconds:.1f} s ({100 * seconds / total:.0f}%)")
        if any(summary[p]["buckets"].get(name) for p in pids):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **sampled total** | " + " | ".join(f"{summary[p]['seconds']:.1f} s" for p in pids) + " |")
    return "\n".join(lines)
