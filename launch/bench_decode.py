"""Where a decode step's time goes, and what a whole step costs, on the default model's shapes.

One rank's executor over SmolLM2's 30 layers (random weights in bf16, the engine's own code, prepacked linears
as a job uses them), one thread, eager. Per point (sequences x cached tokens) it prints the best of
``--repeats`` whole steps (``Executor.forward``) in this thread's CPU time (``time.thread_time``: other work on
a shared machine inflates nothing), and with ``--profile`` the shares of a step by region (best
of ``--repeats`` again), each call of a region timed in thread CPU time: the linears, the norms, the
attention call (K/V write and kernel), the rest of the decoder layers (rotary apply, reshapes, activation,
residual adds, their Python), rotary tables, the step's inputs, embedding, head. torch.profiler was tried
first: its per-operator overhead made a 41 ms step 216 ms, which says nothing about the small regions.

    OMP_NUM_THREADS=1 python launch/bench_decode.py [--model DIR] [--repeats 5] [--profile]

``--threads N`` (N > 1) runs the steps on N torch threads and times them in wall time instead (only a quiet
machine gives a figure then): what one rank with N cores would take, without a job around it.
"""
from __future__ import annotations

import argparse
import collections
import time

import mpi4py

mpi4py.rc.initialize = False  # this process is no MPI rank

POINTS = ((1, 256), (64, 256), (256, 128))
"""(sequences, tokens cached for each) of the timed decode steps."""


def _region(module) -> str | None:
    """The region a module's call counts to (None: its time stays with its caller)."""
    name = type(module).__name__
    if "RMSNorm" in name:
        return "norms"
    if getattr(module, "weight", None) is not None and module.weight.dim() == 2 \
            and name not in ("ScaledEmbedding", "Embedding"):
        return "linears"
    if name.endswith("DecoderLayer"):
        return "decoder layers (all)"
    return None


LABELS = ("linears", "norms", "attention call (KV write + kernel)", "rotary tables", "step inputs (host)",
          "embedding", "head (norm, lm_head)", "decoder layers (all)")


class Clock:
    """Thread CPU seconds per region: each wrapped call adds its time (regions nest: a linear inside a layer
    counts to both, and the report takes the inner ones out)."""

    def __init__(self):
        self.seconds = collections.Counter()

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        seconds = self.seconds

        def wrapper(*args, **kwargs):
            began = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.thread_time() - began
        setattr(owner, name, wrapper)


def main() -> None:
    import torch

    from bench_compile import smollm2_executor  # launch/, this script's directory

    from seesaw_ds.model import attention
    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="also print each point's shares by region")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; above 1 the steps are timed in wall time")
    args, executor, checkpoint = smollm2_executor(parser)
    torch.set_num_threads(args.threads)
    clock, kind = (time.thread_time, "thread CPU time") if args.threads == 1 else (time.perf_counter, "wall time")
    stage = executor.stages["decode"]
    generator = torch.Generator().manual_seed(0)

    def step(seqs: int, length: int) -> float:
        cache = executor.cache()
        for seq_id in list(cache.allocator.tables):
            cache.allocator.free(seq_id)
        ids = torch.randint(0, checkpoint.config.vocab_size, (seqs,), generator=generator).tolist()
        work = [SeqWork(i, 0, [ids[i]], start=length) for i in range(seqs)]
        for w in work:
            cache.allocator.ensure(w.seq_id, length + 1)
        began = clock()
        executor.forward(ForwardPlan("decode", work))
        return clock() - began

    for point in POINTS:
        step(*point)  # warm up (the kernel's first call, allocations)
    for seqs, length in POINTS:
        best = min(step(seqs, length) for _ in range(args.repeats))
        print(f"decode {seqs:4d} x {length:4d}: {best * 1e3:8.2f} ms per step (best of {args.repeats}, {kind}, "
              f"{args.threads} thread{'s' if args.threads > 1 else ''})", flush=True)
    if not args.profile or args.threads > 1:  # the regions' clocks are the thread's own
        return
    regions = Clock()  # step() keeps timing whole steps with `clock`
    for module in stage.layers.modules():  # the head's norm and lm_head count to the head
        label = _region(module)
        if label is not None:
            regions.wrap(module, "forward", label)
    regions.wrap(attention, "_attend", "attention call (KV write + kernel)")
    regions.wrap(stage.rope, "forward", "rotary tables")
    regions.wrap(executor, "_decode_inputs", "step inputs (host)")
    regions.wrap(stage, "embed_tokens", "embedding")
    regions.wrap(stage, "head", "head (norm, lm_head)")
    for seqs, length in POINTS:
        step(seqs, length)
        best = None
        for _ in range(args.repeats):
            regions.seconds.clear()
            total = step(seqs, length)
            if best is None or total < best[0]:
                best = total, dict(regions.seconds)
        total, parts = best
        layers = parts.get("decoder layers (all)", 0.0)
        inner = {k: parts.get(k, 0.0) for k in ("linears", "norms", "attention call (KV write + kernel)")}
        rows = [(label, parts.get(label, 0.0)) for label in LABELS[:-1]]
        rows.append(("layers: everything else (rotary apply, reshapes, activation, residuals, Python)",
                     layers - sum(inner.values())))
        rows.append(("forward outside these (micro-batches, logits, Python)", total - layers - sum(
            parts.get(k, 0.0) for k in LABELS[3:7])))
        print(f"decode {seqs:4d} x {length:4d}, split step {total * 1e3:.2f} ms (best of {args.repeats}, each call "
              f"timed: the timers add a little):", flush=True)
        for label, seconds in rows:
            print(f"    {label:80s} {seconds * 1e3:8.2f} ms  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
