"""Workloads for the simulator: per-request prompt and output token counts.

Two synthetic, seeded length distributions stand in for the paper's datasets (the token counts are all a
throughput simulation needs), and a user's JSONL gives real counts. The synthetic ones follow the
artifact's filtering (`benchmark/dataload.py`): ShareGPT keeps prompts of >= 100 tokens and outputs of
>= 20 with prompt + output <= 4096, inputs and outputs of comparable length; arXiv summarization keeps
articles (prompts) and abstracts (outputs) with prompt + output <= 4096, so prompts of a few thousand
tokens and outputs of ~200-300. Their parameters are our assumptions (the paper prints no statistics).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def _lognormal_pairs(rng: np.random.Generator, count: int, *, prompt_median: float, prompt_sigma: float,
                     output_median: float, output_sigma: float, min_prompt: int, min_output: int,
                     max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Rejection-sample (prompt, output) pairs from independent log-normals until ``count`` pass the filter."""
    prompts: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    have = 0
    while have < count:
        p = np.rint(rng.lognormal(np.log(prompt_median), prompt_sigma, 4 * count)).astype(np.int64)
        o = np.rint(rng.lognormal(np.log(output_median), output_sigma, 4 * count)).astype(np.int64)
        keep = (p >= min_prompt) & (o >= min_output) & (p + o <= max_total)
        prompts.append(p[keep])
        outputs.append(o[keep])
        have += int(keep.sum())
    return np.concatenate(prompts)[:count], np.concatenate(outputs)[:count]


def sharegpt(num_requests: int = 2000, seed: int = 0, max_total: int = 4096) -> Workload:
    """ShareGPT-like chat: prompts median 300 tokens (log-normal, sigma 1.0, >= 100), outputs median 250
    (sigma 0.9, >= 20), prompt + output <= max_total."""
    rng = np.random.default_rng(seed)
    p, o = _lognormal_pairs(rng, num_requests, prompt_median=300, prompt_sigma=1.0, output_median=250,
                            output_sigma=0.9, min_prompt=100, min_output=20, max_total=max_total)
    return Workload("sharegpt", p, o)


def arxiv(num_requests: int = 500, seed: int = 0, max_total: int = 4096) -> Workload:
    """arXiv-summarization-like: articles median 3000 tokens (log-normal, sigma 0.4) and abstracts median
    250 (sigma 0.3, >= 20), pairs with prompt + output <= max_total kept (the filter leaves mostly
    1,500-3,800-token prompts)."""
    rng = np.random.default_rng(seed)
    p, o = _lognormal_pairs(rng, num_requests, prompt_median=3000, prompt_sigma=0.4, output_median=250,
                            output_sigma=0.3, min_prompt=100, min_output=20, max_total=max_total)
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
