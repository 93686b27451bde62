"""Where prefill time goes, in seesaw_ds and in vLLM-CPU: torch.profiler over the same prompts, by category.

- ``--engine seesaw`` (the project's venv): one rank of the bench's static dp2 (one thread, SmolLM2's 30
  layers in bf16, random weights: the time does not depend on the values; prepacked linears as a job uses
  them), prefill steps packed as the scheduler packs one replica's share (``--step-tokens``: half of
  ``scheduler.max_prefill_tokens`` under dp2), the K/V written to a host staging area on its copy thread as
  in a job.
- ``--engine vllm`` (run with the vLLM venv's python, ``.cache/vllm-venv/bin/python``): vLLM-CPU as the
  bench's ``vllm_2cores`` peer runs it (compiled, two OpenMP threads bound to CPUs 0-1), in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the uni-process executor) so that the profiler sees its forward; one
  output token a prompt.

Each prints its operators' self time by category (linears, attention, the rest of the operators:
elementwise, norms, copies; for vLLM the inductor kernels of its compiled graphs), the staging copies, and
what is left of the wall time (Python and host work), as shares of the profiled time; then the slowest
operators. The prompts are a bench run's ``workload.json`` (default: uniform 61-558 random tokens).

    OMP_NUM_THREADS=1 .venv/bin/python launch/profile_prefill.py --workload runs/.../workload.json
    .cache/vllm-venv/bin/python launch/profile_prefill.py --engine vllm --model DIR --workload ...
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

#: category -> markers in an operator's name; an operator counts in its outermost marked ancestor's category
CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "prefill_attention", "seesaw::attention",
                   "cpu_attention", "_C::attn", "paged_attention", "sdpa")),
    ("linears", ("_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "onednn_mm", "packed_linear")),
)


def _category(name: str) -> str | None:
    for label, markers in CATEGORIES:
        if any(marker in name for marker in markers):
            return label
    return None


def shares(profiler, wall_s: float, main_thread: int | None = None) -> tuple[dict, collections.Counter]:
    """({category: seconds} over the main thread's operators plus the other threads' time and the rest of the
    wall time, {operator: self seconds})."""
    events = [e for e in profiler.events() if e.device_type.name == "CPU"]
    per_thread = collections.Counter()
    for event in events:
        if event.cpu_parent is None:
            per_thread[event.thread] += event.cpu_time_total
    if main_thread is None:
        main_thread = per_thread.most_common(1)[0][0]
    out: dict[str, float] = collections.Counter()
    selfs: collections.Counter = collections.Counter()
    for event in events:
        selfs[event.name] += event.self_cpu_time_total / 1e6
        if event.thread != main_thread:
            out["other threads (staging copies)"] += event.self_cpu_time_total / 1e6
            continue
        label, node = None, event  # the outermost marked operator decides (attention's own matmuls are attention)
        while node is not None:
            label, node = _category(node.name) or label, node.cpu_parent
        out[label or "other operators (elementwise, norms, copies)"] += event.self_cpu_time_total / 1e6
    out["python / host (rest of the wall time)"] = wall_s - per_thread[main_thread] / 1e6
    return dict(out), selfs


def report(title: str, wall_s: float, tokens: int, parts: dict, selfs: collections.Counter) -> None:
    print(f"{title}: {tokens} prompt tokens in {wall_s:.2f} s under the profiler ({tokens / wall_s:.0f} tok/s)")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:48s} {seconds:7.2f} s  {100 * seconds / wall_s:5.1f}%")
    print("  slowest operators (self time):")
    for name, seconds in selfs.most_common(14):
        print(f"    {name[:70]:70s} {seconds:7.3f} s  {100 * seconds / wall_s:5.1f}%")


def load_prompts(path: str | None) -> list[list[int]]:
    if path:
        return json.load(open(path))["prompts"]
    import random
    rng = random.Random(0)
    return [[rng.randrange(2, 49000) for _ in range(rng.randint(61, 558))] for _ in range(128)]


def seesaw(args, prompts: list[list[int]]) -> None:
    import mpi4py
    mpi4py.rc.initialize = False  # this process is no MPI rank
    import torch
    from torch.profiler import ProfilerActivity, profile

    from seesaw_ds.backends.accelerator import Streams
    from seesaw_ds.cache import cache_root
    from seesaw_ds.kv.staging import HostKV
    from seesaw_ds.kv.transfer import DeviceCopies
    from seesaw_ds.model import kernels
    from seesaw_ds.model.executor import ForwardPlan, SeqWork
    from seesaw_ds.model.pretrained import ensure_smollm2
    from seesaw_ds.sim import profile as engine_profile

    torch.set_num_threads(args.threads)
    steps, current = [], []
    for prompt in prompts:
        if current and sum(map(len, current)) + len(prompt) > args.step_tokens:
            steps.append(current)
            current = []
        current.append(prompt)
    steps.append(current)
    engine_profile.PROFILE_LAYERS = 1000  # every layer of the model
    model = args.model or str(ensure_smollm2(cache_root()))
    executor, _ = engine_profile._executor(model, "bfloat16", device_tokens=4 * args.step_tokens)
    dims = executor.dims
    capacity = 2 * args.step_tokens + 1024

    class Staging(HostKV):
        def prefill_sink(self, batch, bounds, groups):
            return self.sink(batch, bounds, range(dims.num_kv_heads), 0, dims.num_kv_heads)

    area = torch.zeros((dims.num_layers, 2, dims.num_kv_heads, capacity, dims.head_dim), dtype=executor.dtype)
    staging = Staging(area, dims, executor.dtype, DeviceCopies(Streams(torch.device("cpu"))))
    executor.staging = staging
    inner = kernels.prefill_attention

    def marked(*a, **k):  # the extension's call is no dispatcher operator: name it for the profiler
        with torch.profiler.record_function("seesaw::prefill_attention"):
            return inner(*a, **k)
    kernels.prefill_attention = marked

    def step(prompts_of_step) -> float:
        work, slot = [], 0
        for i, prompt in enumerate(prompts_of_step):
            work.append(SeqWork(i, 0, prompt, staging_extents=[(slot, len(prompt))]))
            slot += len(prompt)
        began = time.thread_time() if args.no_profiler else time.perf_counter()
        executor.forward(ForwardPlan("prefill", work, sink="staging"))
        staging.finish_writes()
        return (time.thread_time() if args.no_profiler else time.perf_counter()) - began

    step(steps[0])  # warm-up (oneDNN primitives, the kernel's build)
    chosen = steps[1:1 + args.steps]
    tokens = sum(len(p) for s in chosen for p in s)
    if args.no_profiler:  # the main thread's CPU time (the machine may be shared), variants alternated
        import resource
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        variants = [int(rows) for rows in args.block_rows.split(",")] if args.block_rows else [None]
        times = {rows: [] for rows in variants}
        for _ in range(args.repeats):
            for rows in variants:
                if rows is not None:
                    kernels.PREFILL_BLOCK_ROWS = rows
                times[rows].append(sum(step(s) for s in chosen))
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (args.repeats * len(chosen)
                                                                                   * len(variants))
        for rows, walls in times.items():
            print(f"seesaw (block_rows={rows}): {tokens} prompt tokens, best of {args.repeats} in the main thread's "
                  f"CPU time: {min(walls):.2f} s ({tokens / min(walls):.0f} tok/s); all {[round(w, 2) for w in walls]}")
        print(f"{faults:.0f} page faults a step")
        return
    copying = staging.stats.swap_out_seconds
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = sum(step(s) for s in chosen)
    parts, selfs = shares(prof, wall)
    parts["staging copies (copy thread, beside the above)"] = staging.stats.swap_out_seconds - copying
    report(f"seesaw_ds, one rank, {args.threads} thread(s), {len(chosen)} steps of <= {args.step_tokens} tokens",
           wall, tokens, parts, selfs)


def vllm(args, prompts: list[list[int]]) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.pop("OMP_NUM_THREADS", None)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, tokenizer=args.model, dtype="bfloat16", max_model_len=8192, seed=0,
              distributed_executor_backend="uni")  # the worker in this process, where the profiler is
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)  # warm-up
    chosen = prompts[8:8 + args.prompts]
    tokens = sum(map(len, chosen))
    batch = [{"prompt_token_ids": p} for p in chosen]
    if args.no_profiler:
        walls = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            walls.append(time.perf_counter() - began)
        print(f"vllm: {tokens} prompt tokens, best of {args.repeats}: {min(walls):.2f} s "
              f"({tokens / min(walls):.0f} tok/s); all {[round(w, 2) for w in walls]}")
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - began
    parts, selfs = shares(prof, wall, main_thread=None)
    report(f"vLLM-CPU {getattr(sys.modules.get('vllm'), '__version__', '?')} compiled, OMP threads 0-1",
           wall, tokens, parts, selfs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("seesaw", "vllm"), default="seesaw")
    parser.add_argument("--model", default=None, help="checkpoint directory (vllm: required)")
    parser.add_argument("--workload", default=None, help="a bench run's workload.json")
    parser.add_argument("--step-tokens", type=int, default=2048, help="seesaw: prompt tokens per step")
    parser.add_argument("--steps", type=int, default=3, help="seesaw: profiled steps (after a warm-up step)")
    parser.add_argument("--prompts", type=int, default=40, help="vllm: profiled prompts (after 8 of warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="seesaw: torch threads")
    parser.add_argument("--no-profiler", action="store_true", help="time only, best of --repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-rows", default=None, help="seesaw, --no-profiler: kernels.PREFILL_BLOCK_ROWS "
                        "values to alternate, e.g. 0,64")
    args = parser.parse_args()
    prompts = load_prompts(args.workload)
    (vllm if args.engine == "vllm" else seesaw)(args, prompts)


if __name__ == "__main__":
    main()
