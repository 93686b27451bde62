"""Synthetic request lengths, the one home of them, and the planner's workloads (token counts per request).

Every synthetic workload of the project draws its lengths here, from a seed: the planner's and the simulator's
(:class:`Workload`: token counts are all a throughput simulation needs) and the benchmark's
(``seesaw_ds/bench/workloads.py`` puts token ids or real text around the lengths drawn here). A user's JSONL
gives real counts (:func:`from_jsonl`).

Two ways to draw, each kept exactly as its users have had it (the planner's plans and the benchmark's runs of a
seed do not move; tests/unit/test_workload_pins.py pins them):

- the planner's :func:`lognormal_pairs`: numpy, vectorised, pairs outside the bounds rejected. Its ShareGPT
  and arXiv shapes (:data:`SHAREGPT`, :data:`ARXIV`) follow the Seesaw artifact's filtering
  (`benchmark/dataload.py`): ShareGPT keeps prompts of >= 100 tokens and outputs of >= 20 with prompt +
  output <= 4096, inputs and outputs of comparable length; arXiv summarization keeps articles (prompts) and
  abstracts (outputs) with prompt + output <= 4096, so prompts of a few thousand tokens and outputs of
  ~200-300. Their parameters are our assumptions (the paper prints no statistics);
- the benchmark's :func:`fitted_lengths` and :func:`uniform_lengths`: Python's ``random``, one request at a
  time (the benchmark draws each prompt's token ids from the same generator in between), lengths clipped
  into their bounds and the prompt cut to fit the model. Its ShareGPT- and arXiv-like shapes
  (:data:`SHAREGPT_LIKE`, :data:`ARXIV_LIKE`) are scaled to a small model's context.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class LengthDistribution:
    """Log-normal lengths within ``[minimum, maximum]``; ``sigma == 0`` gives the median every time."""

    median: float
    """Median length in tokens."""
    sigma: float
    """Standard deviation of log(length): 0.8 is a long tail, 0 a constant."""
    minimum: int
    """Shortest length allowed."""
    maximum: int
    """Longest length allowed."""

    def draw(self, rng: random.Random) -> int:
        """One length, clipped into the bounds."""
        value = self.median * math.exp(rng.gauss(0.0, self.sigma)) if self.sigma > 0 else self.median
        return int(min(self.maximum, max(self.minimum, round(value))))

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` lengths rounded to integers, not yet held to the bounds (:func:`lognormal_pairs` rejects)."""
        return np.rint(rng.lognormal(np.log(self.median), self.sigma, count)).astype(np.int64)

    def holds(self, lengths: np.ndarray) -> np.ndarray:
        """Which of ``lengths`` lie within the bounds."""
        return (lengths >= self.minimum) & (lengths <= self.maximum)


#: The planner's synthetic shapes (prompt, output), the pairs also held to prompt + output <= max_total.
SHAREGPT = (LengthDistribution(300, 1.0, 100, 4096), LengthDistribution(250, 0.9, 20, 4096))
ARXIV = (LengthDistribution(3000, 0.4, 100, 4096), LengthDistribution(250, 0.3, 20, 4096))
#: The benchmark's synthetic shapes (input, output); clipped further by the model's context.
SHAREGPT_LIKE = (LengthDistribution(180, 0.9, 4, 1024), LengthDistribution(200, 0.8, 4, 512))
ARXIV_LIKE = (LengthDistribution(1200, 0.5, 256, 4096), LengthDistribution(180, 0.4, 32, 512))


def lognormal_pairs(rng: np.random.Generator, count: int, prompt: LengthDistribution, output: LengthDistribution,
                    max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (prompt, output) pairs from independent log-normals, drawn in batches of ``4 * count`` and
    rejected unless both lie within their bounds and prompt + output <= ``max_total``."""
    prompts: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    have = 0
    while have < count:
        p, o = prompt.sample(rng, 4 * count), output.sample(rng, 4 * count)
        keep = prompt.holds(p) & output.holds(o) & (p + o <= max_total)
        prompts.append(p[keep])
        outputs.append(o[keep])
        have += int(keep.sum())
    return np.concatenate(prompts)[:count], np.concatenate(outputs)[:count]


def fitted_lengths(rng: random.Random, prompt: LengthDistribution, output: LengthDistribution,
                   max_total: int) -> Iterator[tuple[int, int]]:
    """Endless (prompt, output) lengths, one clipped draw of each per request; the output capped at
    ``max_total - 1`` and the prompt cut so the pair fits ``max_total`` (at least one token). Lazy: a caller
    may draw from ``rng`` between requests."""
    while True:
        prompt_len, output_len = prompt.draw(rng), output.draw(rng)
        output_len = min(output_len, max_total - 1)
        yield max(1, min(prompt_len, max_total - output_len)), output_len


def uniform_lengths(rng: random.Random, prompt: tuple[int, int],
                    output: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """Endless (prompt, output) lengths, each uniform in its inclusive range. Lazy, as :func:`fitted_lengths`."""
    while True:
        yield rng.randint(*prompt), rng.randint(*output)


@dataclass(frozen=True)
class Workload:
    """Requests as two equal-length integer arrays; request i has prompt_lens[i] and output_lens[i] tokens."""

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __post_init__(self) -> None:
        if len(self.prompt_lens) != len(self.output_lens) or len(self.prompt_lens) == 0:
            raise ValueError(f"workload {self.name!r} needs one output length per prompt and at least one request")
        if self.prompt_lens.min() < 1 or self.output_lens.min() < 1:
            raise ValueError(f"workload {self.name!r}: every prompt and output needs at least one token")

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lens)

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_lens.sum())

    @property
    def output_tokens(self) -> int:
        return int(self.output_lens.sum())

    @property
    def max_len(self) -> int:
        """Longest prompt + output."""
        return int((self.prompt_lens + self.output_lens).max())

    def every(self, step: int) -> "Workload":
        """Every ``step``-th request: a 1/step sample with the same order and length distribution."""
        if step <= 1:
            return self
        return Workload(f"{self.name}/every{step}", self.prompt_lens[::step].copy(), self.output_lens[::step].copy())

    def split(self, parts: int) -> list["Workload"]:
        """Round-robin split into ``parts`` workloads (independent replicas); empty parts are dropped."""
        return [Workload(f"{self.name}[{i}::{parts}]", self.prompt_lens[i::parts].copy(),
                         self.output_lens[i::parts].copy()) for i in range(min(parts, self.num_requests))]


def sharegpt(num_requests: int = 2000, seed: int = 0, max_total: int = 4096) -> Workload:
    """ShareGPT-like chat (:data:`SHAREGPT`): prompts median 300 tokens (log-normal, sigma 1.0, >= 100),
    outputs median 250 (sigma 0.9, >= 20), prompt + output <= max_total."""
    p, o = lognormal_pairs(np.random.default_rng(seed), num_requests, *SHAREGPT, max_total=max_total)
    return Workload("sharegpt", p, o)


def arxiv(num_requests: int = 500, seed: int = 0, max_total: int = 4096) -> Workload:
    """arXiv-summarization-like (:data:`ARXIV`): articles median 3000 tokens (log-normal, sigma 0.4) and
    abstracts median 250 (sigma 0.3, >= 20), pairs with prompt + output <= max_total kept (the filter leaves
    mostly 1,500-3,800-token prompts)."""
    p, o = lognormal_pairs(np.random.default_rng(seed), num_requests, *ARXIV, max_total=max_total)
    return Workload("arxiv", p, o)


def constant(num_requests: int, prompt_len: int, output_len: int) -> Workload:
    """Every request the same (the paper's P:D sensitivity study)."""
    return Workload(f"constant{prompt_len}x{output_len}", np.full(num_requests, prompt_len, dtype=np.int64),
                    np.full(num_requests, output_len, dtype=np.int64))


def _count(line: dict, where: str) -> tuple[int, int]:
    body = line.get("body") if isinstance(line.get("body"), dict) else line
    for key in ("prompt_tokens", "prompt_len", "num_prompt_tokens"):
        if key in body:
            prompt = body[key]
            break
    else:
        ids = body.get("prompt_token_ids", body.get("prompt") if isinstance(body.get("prompt"), list) else None)
        if ids is None:
            raise ValueError(f"{where}: give the prompt's token count as 'prompt_tokens' (or 'prompt_token_ids'); "
                             "the planner does not tokenize text")
        prompt = len(ids)
    output = body.get("max_tokens", body.get("output_tokens"))
    if output is None:
        raise ValueError(f"{where}: give 'max_tokens' (the output length to simulate)")
    if not isinstance(prompt, int) or not isinstance(output, int) or prompt < 1 or output < 1:
        raise ValueError(f"{where}: prompt tokens ({prompt!r}) and max_tokens ({output!r}) must be integers >= 1")
    return prompt, output


def from_jsonl(path: str | Path) -> Workload:
    """Read ``{"prompt_tokens": int | "prompt_token_ids": [...], "max_tokens": int}`` lines (OpenAI batch
    lines with those keys in ``body`` too); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"workload file {str(path)!r} does not exist; give planner.workload_path=<a JSONL file>")
    prompts, outputs = [], []
    with path.open() as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(line, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            p, o = _count(line, where)
            prompts.append(p)
            outputs.append(o)
    if not prompts:
        raise ValueError(f"workload file {str(path)!r} has no requests")
    return Workload(path.stem, np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64))
