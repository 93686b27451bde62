"""Time the engine's own forward pass on this machine: the compute half of the planner's calibration.

A matmul micro-benchmark says what the hardware can do; the engine reaches a fraction of it that depends on
its kernels, its small matrices and its Python frames, and that fraction changes whenever the engine
does. So this module times what a rank actually runs: the engine's :class:`~seesaw_ds.model.executor.Executor`
over a few-layer cut of the job's model (its config with ``num_hidden_layers`` cut to :data:`PROFILE_LAYERS`,
random weights in the job's dtype, the same shapes), under a single-rank layout with the threads a rank of
the job gets. It runs prefill and decode steps of the sizes the scheduler makes, splits each step's time
into the decoder layers, the head (final norm + ``lm_head``), the rest of the forward (embedding, inputs) and
the engine's sampling, and fits :class:`~seesaw_ds.sim.cost.ComputeProfile` (twelve
coefficients, see :func:`fit_profile`; the timing takes a few seconds).

:func:`measure_profile` runs the timing in a child process (``python -m seesaw_ds.sim.profile``), so the
caller (the launcher, or rank 0 under srun) imports neither DeepSpeed nor the model code, and the child is
no MPI rank: MPI is not initialised there and the launcher's PMI variables are not passed on.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from seesaw_ds.sim.cost import ComputeProfile

PROFILE_LAYERS = 2
"""Decoder layers in the timed cut of the model (per-layer costs are its layers' time / this)."""
PREFILL_POINTS = ((1, 32), (1, 256), (1, 1024), (4, 64), (4, 384), (16, 96), (8, 256))
"""(sequences, tokens each) of the timed prefill steps: one packed row each."""
DECODE_POINTS = ((1, 64), (4, 256), (8, 512), (32, 128), (64, 64), (64, 512), (128, 256), (192, 128))
"""(sequences, cached tokens each) of the timed decode steps."""


# -- the fit (pure) ------------------------------------------------------------------------------------------
def nonnegative_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost has no negative part): solve, drop the most
    negative coefficient, solve again. Rows are weighted by 1/target so small steps count as much as big
    ones (relative error)."""
    features, target = np.asarray(features, dtype=float), np.asarray(target, dtype=float)
    weight = 1.0 / np.maximum(target, 1e-9)
    a, b = features * weight[:, None], target * weight
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coef


def fit_profile(samples: list[dict], *, threads: int, dtype: str, layers: int = PROFILE_LAYERS,
                engine: str = "") -> ComputeProfile:
    """A :class:`ComputeProfile` from timed steps. Each sample: ``phase`` (prefill | decode), ``seqs``,
    ``tokens``, ``pairs``, ``kv_read`` and the seconds of ``layers_s`` (all ``layers`` decoder layers),
    ``head_s`` (final norm and ``lm_head``), ``rest_s`` (the rest of the executor's forward) and
    ``sample_s`` (the engine's sampling)."""
    prefill = [s for s in samples if s["phase"] == "prefill"]
    decode = [s for s in samples if s["phase"] == "decode"]
    if len(prefill) < 4 or len(decode) < 3:
        raise ValueError(f"fit_profile needs >= 4 prefill and >= 3 decode samples, got {len(prefill)} and "
                         f"{len(decode)}")

    def fit(rows, columns, value) -> tuple[float, ...]:
        features = np.array([[1.0] + [float(r[c]) for c in columns] for r in rows])
        return tuple(float(x) for x in nonnegative_lstsq(features, np.array([value(r) for r in rows])))

    per_layer = lambda r: r["layers_s"] / layers  # noqa: E731
    rest = lambda r: max(r["rest_s"], 0.0)  # noqa: E731
    p0, p_token, p_pair, p_seq = fit(prefill, ("tokens", "pairs", "seqs"), per_layer)
    d0, d_seq, d_kv = fit(decode, ("seqs", "kv_read"), per_layer)
    h0, h_seq = fit(samples, ("seqs",), lambda r: r["head_s"] + r["sample_s"])
    s0, s_token, s_seq = fit(samples, ("tokens", "seqs"), rest)
    return ComputeProfile(prefill_layer_s=p0, prefill_token_s=p_token, prefill_pair_s=p_pair, prefill_seq_s=p_seq,
                          decode_layer_s=d0, decode_seq_s=d_seq, decode_kv_token_s=d_kv, head_s=h0,
                          head_seq_s=h_seq, step_s=s0, step_token_s=s_token, step_seq_s=s_seq, threads=threads,
                          dtype=dtype, engine=engine)


# -- running it in a child process -----------------------------------------------------------------------------
_RANK_VARIABLES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDRA_", "MPIR_", "I_MPI_")


def child_environment(parent: dict[str, str], threads: int) -> dict[str, str]:
    """The child's environment: the parent's without the variables that would make it an MPI rank (PMI,
    Open MPI, Hydra), with ``threads`` OpenMP threads (pure)."""
    env = {k: v for k, v in parent.items() if not k.startswith(_RANK_VARIABLES)}
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def measure_profile(model_path: str | Path, *, dtype: str, threads: int, timeout_s: float = 300.0) -> ComputeProfile:
    """Time the engine on ``model_path``'s shapes in ``dtype`` with ``threads`` threads (a child process);
    RuntimeError with the child's last line when it fails."""
    command = [sys.executable, "-m", "seesaw_ds.sim.profile", "--model", str(model_path), "--dtype", dtype,
               "--threads", str(threads)]
    repo = str(Path(__file__).resolve().parent.parent.parent)
    env = child_environment(dict(os.environ), threads)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=repo)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the engine profile failed (exit {done.returncode}): {tail}")
    return ComputeProfile.from_json(json.loads(lines[-1]))


# -- the timing itself (the child) -----------------------------------------------------------------------------
class _RandomHost:
    """Stands in for :class:`~seesaw_ds.model.loader.HostWeights`: the same names, roles and host shapes,
    filled with small random values (timing does not depend on the values)."""

    def __init__(self, plan: dict, dtype, tied: bool):
        import torch

        from seesaw_ds.model.shards import host_shape

        generator = torch.Generator().manual_seed(0)
        self.dtype = dtype
        self.roles = {name: tensor.role for name, tensor in plan.items()}
        self._views = {name: (torch.randn(host_shape(tensor.shape, tensor.role), generator=generator) * 0.02).to(dtype)
                       for name, tensor in plan.items()}
        if tied or "lm_head.weight" not in self._views:
            self._views["lm_head.weight"] = self._views["model.embed_tokens.weight"]
            self.roles["lm_head.weight"] = self.roles["model.embed_tokens.weight"]

    def get(self, name: str):
        return self._views[name]


def _cut_checkpoint(model_path: str, layers: int):
    """The checkpoint's metadata with its config cut to ``layers`` decoder layers."""
    from seesaw_ds.model.families import model_spec
    from seesaw_ds.model.loader import open_checkpoint

    checkpoint = open_checkpoint(model_path)
    config = copy.deepcopy(checkpoint.config)
    config.num_hidden_layers = min(layers, config.num_hidden_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:config.num_hidden_layers]
    return type(checkpoint)(path=checkpoint.path, config=config, tensors=checkpoint.tensors, spec=model_spec(config))


def _executor(model_path: str, dtype_name: str, device_tokens: int):
    import torch

    from seesaw_ds.distributed.layout import Layout
    from seesaw_ds.model.executor import Executor
    from seesaw_ds.model.loader import parse_dtype, plan_host_tensors
    from seesaw_ds.model.template import build_template, parameter_shapes

    checkpoint = _cut_checkpoint(model_path, PROFILE_LAYERS)
    template = build_template(checkpoint.config)
    plan = plan_host_tensors(checkpoint, parameter_shapes(template))
    host = _RandomHost(plan, parse_dtype(dtype_name, checkpoint.config_dtype), checkpoint.tied_embeddings)
    groups = SimpleNamespace(layout=Layout(), dp_index=0, pp_index=0, tp_index=0, tp_ranks=(0,), pp_ranks=(0,),
                             tp_group=None, tp_host_group=None, shm_allreduce=False, is_first_stage=True,
                             is_last_stage=True, prev_rank=None, next_rank=None)
    topology = SimpleNamespace(layouts={"prefill": groups, "decode": groups}, instance_rank=0)
    executor = Executor(topology, host, template, checkpoint.spec, device_tokens=device_tokens,
                        device=torch.device("cpu"))
    executor.activate("decode")
    return executor, checkpoint


def _timed(stage, name: str, into: dict) -> None:
    """Wrap ``stage.<name>`` so each call adds its seconds to ``into[name]``."""
    original = getattr(stage, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        out = original(*args, **kwargs)
        into[name] = into.get(name, 0.0) + time.perf_counter() - began
        return out
    setattr(stage, name, wrapper)


def time_engine(model_path: str, dtype: str, threads: int, repeats: int = 4) -> list[dict]:
    """Every point of :data:`PREFILL_POINTS` and :data:`DECODE_POINTS` through the engine, each part the
    best of ``repeats`` (the machine is shared: the best run is the least disturbed; the rounds go over all
    points in turn, so a burst of load spoils one run of many points rather than every run of one)."""
    import torch

    from seesaw_ds.engine.sampling import SamplingParams, sample_next_tokens
    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    torch.set_num_threads(threads)
    most = max(max(s * (c + 1) for s, c in DECODE_POINTS), max(s * n for s, n in PREFILL_POINTS))
    executor, checkpoint = _executor(model_path, dtype, device_tokens=2 * most + 4096)  # room for reserved growth
    vocab = int(checkpoint.config.vocab_size)
    stage = executor.stages["decode"]
    parts: dict[str, float] = {}
    _timed(stage, "run_layers", parts)
    _timed(stage, "head", parts)
    generator = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0)  # the standard workload samples greedily
    points = [("prefill", s, n) for s, n in PREFILL_POINTS] + [("decode", s, c) for s, c in DECODE_POINTS]

    def step(phase: str, seqs: int, length: int) -> dict:
        cache = executor.cache()
        for seq_id in list(cache.allocator.tables):
            cache.allocator.free(seq_id)
        ids = torch.randint(0, vocab, (seqs, length if phase == "prefill" else 1), generator=generator).tolist()
        work = [SeqWork(i, 0, ids[i], start=0 if phase == "prefill" else length) for i in range(seqs)]
        if phase == "decode":  # the cached tokens and this step's slot, as prefill's reserved growth leaves them
            for w in work:
                cache.allocator.ensure(w.seq_id, length + 1)
        parts.clear()
        began = time.perf_counter()
        _, logits = executor.forward(ForwardPlan(phase, work, sink="device"))
        forward_s = time.perf_counter() - began
        began = time.perf_counter()
        sample_next_tokens(logits, [greedy] * seqs, list(range(seqs)), [1] * seqs, None)
        sample_s = time.perf_counter() - began
        return {"forward_s": forward_s, "layers_s": parts["run_layers"], "head_s": parts["head"],
                "rest_s": forward_s - parts["run_layers"] - parts["head"], "sample_s": sample_s}

    for point in points:
        step(*point)  # warm-up: first touch of buffers, the kernel's build
    runs = [[step(*point) for point in points] for _ in range(repeats)]
    samples = []
    for i, (phase, seqs, length) in enumerate(points):
        best = {part: min(run[i][part] for run in runs) for part in runs[0][i]}
        tokens = seqs * (length if phase == "prefill" else 1)
        pairs = seqs * length * (length + 1) // 2 if phase == "prefill" else seqs * (length + 1)
        samples.append({"phase": phase, "seqs": seqs, "tokens": tokens, "pairs": pairs,
                        "kv_read": 0 if phase == "prefill" else seqs * length, **best})
    return samples


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="time the engine's forward pass; print a ComputeProfile as JSON")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", action="store_true", help="also print every timed step")
    args = parser.parse_args(argv)
    import mpi4py

    mpi4py.rc.initialize = False  # the engine's modules import MPI; this process is no rank
    began = time.perf_counter()
    samples = time_engine(args.model, args.dtype, args.threads)
    profile = fit_profile(samples, threads=args.threads, dtype=args.dtype, engine=engine_fingerprint())
    profile = ComputeProfile(**{**asdict(profile), "seconds": time.perf_counter() - began})
    if args.samples:
        for sample in samples:
            print("# " + json.dumps(sample))
    print(json.dumps(profile.to_json()), flush=True)
    return 0


def engine_fingerprint() -> str:
    """A short hash of the engine's model code (model/*.py, model/csrc/*): which engine a profile timed."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / "model"
    digest = hashlib.sha256()
    for path in sorted([*root.glob("*.py"), *root.glob("csrc/*")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
