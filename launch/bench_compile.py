"""Eager against compiled (model.compile) decoder layers, step by step, on the default model's shapes.

One rank's executor over SmolLM2's 30 layers (random weights in bf16, the shapes and the engine's own code;
prepacked linears as a job uses them), one thread. Each point alternates an eager step and a compiled step
several times and keeps the best of each, in this thread's CPU time (``time.thread_time``), so that other
work on a shared machine inflates neither side. Prints the compile seconds and, per point, both times and
their ratio. Reproduces the figures in docs/benchmarks.md:

    OMP_NUM_THREADS=1 python launch/bench_compile.py [--model DIR] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import mpi4py

mpi4py.rc.initialize = False  # this process is no MPI rank

POINTS = (("decode", 1, 256), ("decode", 64, 256), ("decode", 256, 128), ("prefill", 4, 512))
"""(phase, sequences, tokens: the prompt's for prefill, those cached for decode)."""


def smollm2_executor(parser: argparse.ArgumentParser):
    """``--model`` and ``--repeats`` added to ``parser`` and parsed; one torch thread; a one-rank executor over
    every layer of the model (default SmolLM2, fetched once) in bf16 with random weights. Returns ``(args,
    executor, checkpoint)``. Shared with launch/bench_decode.py."""
    import torch

    from seesaw_ds.cache import cache_root
    from seesaw_ds.model.pretrained import ensure_smollm2
    from seesaw_ds.sim import profile

    parser.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2, fetched once)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = args.model or str(ensure_smollm2(cache_root()))
    profile.PROFILE_LAYERS = 1000  # every layer of the model
    executor, checkpoint = profile._executor(model, "bfloat16", device_tokens=200_000)
    return args, executor, checkpoint


def main() -> None:
    import torch

    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    args, executor, checkpoint = smollm2_executor(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    stage = executor.stages["decode"]
    stage.compile()
    compiled = stage.compiled
    generator = torch.Generator().manual_seed(0)

    def step(phase: str, seqs: int, length: int) -> float:
        cache = executor.cache()
        for seq_id in list(cache.allocator.tables):
            cache.allocator.free(seq_id)
        ids = torch.randint(0, checkpoint.config.vocab_size, (seqs, length if phase == "prefill" else 1),
                            generator=generator).tolist()
        work = [SeqWork(i, 0, ids[i], start=0 if phase == "prefill" else length) for i in range(seqs)]
        if phase == "decode":
            for w in work:
                cache.allocator.ensure(w.seq_id, length + 1)
        began = time.thread_time()
        executor.forward(ForwardPlan(phase, work, sink="device"))
        return time.thread_time() - began

    began = time.perf_counter()
    for point in POINTS:
        step(*point)
    print(f"compile: {compiled.graphs} graphs, {compiled.compile_seconds:.1f} s of compiling "
          f"({time.perf_counter() - began:.1f} s for the first step of every point)", flush=True)
    for point in POINTS:
        eager, fused = [], []
        for _ in range(args.repeats):
            stage.compiled = None
            eager.append(step(*point))
            stage.compiled = compiled
            fused.append(step(*point))
        print(f"{point[0]:7s} {point[1]:4d} x {point[2]:4d}: eager {min(eager) * 1e3:8.2f} ms  compiled "
              f"{min(fused) * 1e3:8.2f} ms  {min(eager) / min(fused):.2f}x", flush=True)


if __name__ == "__main__":
    main()
