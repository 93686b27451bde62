"""Prefill attention on the CPU: ATen's SDPA once per prompt (what the engine runs, through the C++ loop of
seesaw_ds/model/kernels.py) against FlexAttention compiled over the packed row with a document-causal block
mask (issue 14 asked which is faster). SmolLM2's heads by default, bf16, one thread.

    python launch/bench_prefill_attention.py [--lengths 300 250 420 180 350 280 310 260] [--threads 1]

Prints the compile and block-mask times, the largest difference between the two outputs, and the best of
five calls of each (ms and GFLOP/s of causal work), each measured twice, interleaved.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[300, 250, 420, 180, 350, 280, 310, 260])
    parser.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("Q", "KV"))
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths, (n_q, n_kv), dim = args.lengths, args.heads, args.head_dim
    total = sum(lengths)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    make = lambda heads: torch.randn(1, heads, total, dim, dtype=torch.bfloat16)
    query, key, value = make(n_q), make(n_kv), make(n_kv)

    began = time.perf_counter()
    mask = create_block_mask(lambda b, h, q, k: (document[q] == document[k]) & (k <= q), 1, None, total, total,
                             device="cpu")
    print(f"block mask: {time.perf_counter() - began:.1f} s")
    compiled = torch.compile(flex_attention, dynamic=False)
    began = time.perf_counter()
    compiled(query, key, value, block_mask=mask, enable_gqa=True)
    print(f"flex compile and first call: {time.perf_counter() - began:.1f} s")

    def flex():
        return compiled(query, key, value, block_mask=mask, enable_gqa=True)

    def sdpa():
        return torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                         is_causal=True, enable_gqa=True)
                          for a, b in zip(bounds[:-1], bounds[1:])], dim=2)

    print(f"largest difference: {(flex().float() - sdpa().float()).abs().max().item():.4f}")
    flops = sum(4 * n_q * length * length * dim / 2 for length in lengths)
    for name, run in (("sdpa per prompt", sdpa), ("flex", flex)) * 2:
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - began)
        print(f"{name}: {best * 1e3:.1f} ms, {flops / best / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
