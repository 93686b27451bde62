"""Penalties and filters on one step's logits (issue 22 item 3): the per-row code before batching
(tests/penalties_reference.py) against the batched one (seesaw_ds/engine/penalties.py), one thread, SmolLM2's
vocabulary (49,152), every row with repetition, frequency and presence penalties and two logit biases,
300 prompt + 100 output tokens of history a row; best of 5.

    python launch/bench_penalties.py [rows ...]      default: 32 128 256
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

from penalties_reference import reference_apply_penalties_and_filters  # noqa: E402
from seesaw_ds.engine.params import SamplingParams  # noqa: E402
from seesaw_ds.engine.penalties import TokenHistory, apply_penalties_and_filters  # noqa: E402

VOCAB = 49152


def main(row_counts: list[int]) -> None:
    torch.set_num_threads(1)
    rng = random.Random(0)
    for rows in row_counts:
        params = [SamplingParams(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2,
                                 logit_bias=((5, 1.0), (77, -2.0))) for _ in range(rows)]
        histories = [TokenHistory([rng.randrange(VOCAB) for _ in range(300)],
                                  [rng.randrange(VOCAB) for _ in range(100)]) for _ in range(rows)]
        logits = torch.randn(rows, VOCAB)
        for name, apply in (("per row", reference_apply_penalties_and_filters),
                            ("batched", apply_penalties_and_filters)):
            best = float("inf")
            for _ in range(5):
                copy = logits.clone()
                start = time.perf_counter()
                apply(copy, params, histories)
                best = min(best, time.perf_counter() - start)
            print(f"{rows:4d} rows {name:8s}: {best * 1e3:7.1f} ms")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [32, 128, 256])
