"""A bf16 linear's ways on this CPU, on the default model's shapes: what the backend picks between.

Per shape (rows x in x out of SmolLM2-135M's projections and head) the best of ``--repeats`` batches of calls,
in milliseconds a call, wall time (run it on a quiet machine), for each of:

- ``bf16 F.linear``: torch's own bf16 GEMM (oneDNN where it has a bf16 path; an emulated GEMM where it has
  none: an AVX2-only CPU);
- ``bf16 prepacked``: oneDNN over a prepacked bf16 copy (where oneDNN has a bf16 path);
- ``fp32 prepacked`` / ``fp32 oneDNN`` / ``fp32 MKL``: the input widened, a float32 copy of the weight
  (oneDNN-prepacked, row-major through oneDNN, row-major through ``F.linear``), the output rounded to bf16 --
  ``backends.deepspeed``'s copies where oneDNN has no bf16 path (``widens_bf16``);
- ``few-row``: the extension's ``linear_rows`` over the bf16 weight (one or two rows; its bf16 dot-product loop
  in the avx512bf16 build, the portable loop elsewhere).

Every column runs over ``--layers`` distinct weights of the shape (the head over one), so that they stream from
memory as a decode step's do, and reports a call's share.

    OMP_NUM_THREADS=1 python launch/bench_linears.py [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

SHAPES = ((1, 576, 1536), (2, 576, 1536), (64, 576, 1536), (64, 1536, 576), (512, 576, 1536), (64, 576, 49152))
"""(rows, in, out): decode at batch 1 and 2, decode at 64 (gate_proj, down_proj), a prefill chunk, the head."""


def best_ms(call, repeats: int, calls: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30, help="distinct weights the few-row kernel streams")
    args = parser.parse_args()

    import torch

    from seesaw_ds.backends.deepspeed import widens_bf16
    from seesaw_ds.model import kernels

    torch.set_num_threads(args.threads)
    linear, pointwise = torch.nn.functional.linear, torch.ops.mkldnn._linear_pointwise.default
    reorder = torch.ops.mkldnn._reorder_linear_weight
    native = not widens_bf16()
    print(f"torch {torch.__version__}, {args.threads} thread(s), extension build {kernels.isa()}, "
          f"oneDNN bf16 path: {'yes' if native else 'no (the backend widens to float32)'}")
    print("| rows x in x out | bf16 F.linear | bf16 prepacked | fp32 prepacked | fp32 oneDNN | fp32 MKL | few-row |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rows, k, n in SHAPES:
        torch.manual_seed(rows + k + n)
        layers = args.layers if n * k < 2_000_000 else 1  # the head: one (it would not fit 30 times over)
        x = torch.randn(rows, k).bfloat16()
        weights = [torch.randn(n, k).bfloat16() for _ in range(layers)]
        weights32 = [weight.float() for weight in weights]

        def each(call, operands):
            return best_ms(lambda: [call(operand) for operand in operands], args.repeats,
                           max(1, int(2e8 // (rows * k * n * layers)))) / layers

        cells = [each(lambda w: linear(x, w), weights)]
        cells.append(each(lambda p: pointwise(x, p, None, "none", [], ""), [reorder(w, rows) for w in weights])
                     if native else None)
        cells.append(each(lambda p: pointwise(x.float(), p, None, "none", [], "").bfloat16(),
                          [reorder(w, rows) for w in weights32]))
        cells.append(each(lambda w: pointwise(x.float(), w, None, "none", [], "").bfloat16(), weights32))
        cells.append(each(lambda w: linear(x.float(), w).bfloat16(), weights32))
        cells.append(each(lambda w: kernels.linear_rows(x, [w]), weights) if rows <= 2 and kernels.built() else None)
        text = " | ".join("-" if cell is None else f"{cell:.3f}" for cell in cells)
        print(f"| {rows} x {k} x {n} | {text} |", flush=True)

if __name__ == "__main__":
    main()
