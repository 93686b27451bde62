"""Micro-benchmark of the decode-attention kernel (seesaw_ds/model/csrc/decode_attention.cpp): the build this
machine's engine uses against a baseline build, on SmolLM2-135M decode shapes by default.

    python launch/bench_attention.py --baseline-rev HEAD~1     against the AVX2 build of a git revision's sources
    python launch/bench_attention.py                           against this checkout's sources built for AVX2
    python launch/bench_attention.py --baseline-source old.cpp against the AVX2 build of another file
    python launch/bench_attention.py --baseline-rev HEAD~1 --baseline-isa avx512bf16   a change, same build flags
    python launch/bench_attention.py --dtype fp32 --heads 32 --kv-heads 8 --head-dim 128 --layers 2

Defaults: 64 sequences of 100-700 tokens (uniform), 9 query and 3 KV heads of 64, bf16 cache, one run of
slots per sequence (--fragment N: runs of N slots scattered over the cache), 1 and 2 threads. "new" is
``kernels.load()`` (the build the engine picks from /proc/cpuinfo, e.g. ``..._avx512``); "old" is the baseline
sources compiled with the AVX2 build's flags (``kernels.compile_flags("avx2")``: no AVX-512 path), or with
``--baseline-isa``'s. Each
repetition times one call per layer over ``--layers`` separate caches (so that, as in the engine, the KV comes
from memory rather than from the last call's cache lines), the two builds interleaved (old, new, new, old, ...),
the process on glibc's huge-page malloc tunable as the engine's ranks are (``--no-hugepages``: not). Printed:
the medians (and minima) of the time per call, wall clock and, for one thread, the thread's CPU time (less
disturbed by other processes on a shared machine), their ratios new/old, and the load average before and
after. Both builds' outputs are compared once (max abs difference).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from seesaw_ds.distributed.env import anon_hugepage_bytes, export_extension_dir, rank_environment  # noqa: E402
from seesaw_ds.model import kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def baseline(sources: list[Path], isa: str):
    """``sources`` built with build ``isa``'s flags (``kernels.compile_flags``, OpenMP included) under a build
    name of its own per source text, so that builds of different sources do not replace each other."""
    from torch.utils.cpp_extension import load as jit_load

    export_extension_dir()
    digest = hashlib.sha1(b"".join(source.read_bytes() for source in sources)).hexdigest()[:10]
    return jit_load(f"seesaw_decode_attention_bench_{isa}_{digest}", [str(source) for source in sources],
                    extra_cflags=kernels.compile_flags(isa), extra_ldflags=["-fopenmp"], verbose=False)


def workload(args):
    """(query, [(keys, values)] per layer, offsets, first, count): each sequence's tokens in one run of
    consecutive slots, or with --fragment N in runs of N slots scattered over the cache."""
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.seqs,), generator=gen).tolist()
    total = sum(lengths)
    if args.fragment:
        blocks_of = [-(-length // args.fragment) for length in lengths]
        order = torch.randperm(sum(blocks_of), generator=gen).tolist()
        spans, used = [], 0
        for length, n_blocks in zip(lengths, blocks_of):
            runs = []
            for b in range(n_blocks):
                take = min(args.fragment, length - b * args.fragment)
                runs.append((order[used + b] * args.fragment, take))
            used += n_blocks
            spans.append(runs)
        slots = sum(blocks_of) * args.fragment
    else:
        spans, start = [], 0
        for length in lengths:
            spans.append([(start, length)])
            start += length
        slots = total
    runs = kernels.SpanRuns(spans)
    dtype = DTYPES[args.dtype]
    layers = [(torch.randn(slots, args.kv_heads, args.head_dim, generator=gen).to(dtype),
               torch.randn(slots, args.kv_heads, args.head_dim, generator=gen).to(dtype)) for _ in range(args.layers)]
    query = torch.randn(args.seqs, args.heads, args.head_dim, generator=gen)
    return query, layers, runs, lengths


def time_step(module, query, layers, runs, scale) -> tuple[float, float]:
    """Seconds per call, one call per layer: wall clock, and this process's CPU time (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for keys, values in layers:
        module.decode_attention(query, keys, values, runs.offsets, runs.first, runs.count, scale, 0, 0.0)
    return (time.perf_counter() - wall) / len(layers), (time.process_time() - cpu) / len(layers)


def baseline_sources(args) -> list[Path]:
    """The baseline's C++ sources: ``--baseline-rev``'s versions of the extension's files (from git; those the
    revision has), else ``--baseline-source`` (one file), else this checkout's."""
    if not args.baseline_rev:
        return [args.baseline_source] if args.baseline_source else list(kernels._SOURCES)
    folder = Path(tempfile.mkdtemp(prefix="bench_attention_"))
    paths = []
    for source in kernels._SOURCES:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{args.baseline_rev}:{source.relative_to(REPO).as_posix()}"],
                               capture_output=True, text=True)
        if shown.returncode == 0:
            paths.append(folder / source.name)
            paths[-1].write_text(shown.stdout)
    if not paths:
        sys.exit(f"bench_attention: {args.baseline_rev} has none of the extension's sources")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=700)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--fragment", type=int, default=0, help="runs of this many slots, scattered (0: one run)")
    parser.add_argument("--layers", type=int, default=8, help="separate caches, one call each per repetition")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--reps", type=int, default=15, help="repetitions per build (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-source", type=Path,
                        help="one C++ source of the baseline build (default: this checkout's sources)")
    parser.add_argument("--baseline-isa", choices=sorted(kernels.ISA_FLAGS), default="avx2",
                        help="the build flags of the baseline (default: avx2, no AVX-512 path)")
    parser.add_argument("--baseline-rev", help="take the baseline source from this git revision (e.g. HEAD~1)")
    parser.add_argument("--no-hugepages", action="store_true",
                        help="keep malloc on 4 KiB pages (default: glibc's huge-page tunable, as the ranks run)")
    args = parser.parse_args()
    if not args.no_hugepages and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
        # glibc reads the tunable at start only: run again with it, as launch.hugepages does for the ranks
        os.execve(sys.executable, [sys.executable, *sys.argv], rank_environment(dict(os.environ), hugepages=True))

    load_before = Path("/proc/loadavg").read_text().strip()
    new = kernels.load()
    if new is None:
        sys.exit("bench_attention: the kernel could not be built here")
    sources = baseline_sources(args)
    old = baseline(sources, args.baseline_isa)
    query, layers, runs, lengths = workload(args)
    scale = args.head_dim ** -0.5
    keys, values = layers[0]
    want = old.decode_attention(query, keys, values, runs.offsets, runs.first, runs.count, scale, 0, 0.0)
    got = new.decode_attention(query, keys, values, runs.offsets, runs.first, runs.count, scale, 0, 0.0)
    cache_mib = sum(k.numel() * k.element_size() * 2 for k, _ in layers) / 2 ** 20
    print(f"new: {new.__name__} (path {new.path(args.head_dim)}); old: {old.__name__} from "
          f"{args.baseline_rev + ':' if args.baseline_rev else ''}{', '.join(source.name for source in sources)}")
    print(f"{args.seqs} sequences, {sum(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), heads "
          f"{args.heads}/{args.kv_heads}, head_dim {args.head_dim}, {args.dtype} cache, {args.layers} layers "
          f"({cache_mib:.0f} MiB of KV, {anon_hugepage_bytes() / 2 ** 20:.0f} MiB of the process on huge pages), "
          f"runs: {f'{args.fragment} slots' if args.fragment else 'one per sequence'}; "
          f"max |new - old| = {(got - want).abs().max().item():.2e}")
    print(f"loadavg before: {load_before}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for module in (old, new):  # warm-up: page in every layer's cache, start the threads
            time_step(module, query, layers, runs, scale)
        times = {"old": [], "new": []}
        for rep in range(args.reps):
            for name in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                times[name].append(time_step(old if name == "old" else new, query, layers, runs, scale))
        line = [f"threads {threads}:"]
        for kind, index in (("wall", 0), ("cpu", 1))[:2 if threads == 1 else 1]:
            old_ms, new_ms = (statistics.median(t[index] for t in times[n]) * 1e3 for n in ("old", "new"))
            old_min, new_min = (min(t[index] for t in times[n]) * 1e3 for n in ("old", "new"))
            line.append(f"{kind} old {old_ms:.3f} ms/call (min {old_min:.3f}), new {new_ms:.3f} ms/call "
                        f"(min {new_min:.3f}), new/old {new_ms / old_ms:.3f};")
        print(" ".join(line).rstrip(";"))
    print(f"loadavg after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
