"""The benchmark's arithmetic (pure): throughput keys, the workload's FLOP roofline, peer ratios, the table.

Throughput keys are those of ``vllm bench throughput`` (``elapsed_time``, ``num_requests``,
``total_num_tokens``, ``requests_per_second``, ``tokens_per_second``) plus ``output_tokens_per_second``.

The roofline is the least time the cores could take for the workload's arithmetic: its FLOPs over the
measured fp32 matmul rate of the cores used. FLOPs count the work any engine must do:

- linear layers: ``2 * params * tokens``, where ``params`` are the weights a token multiplies (every decoder
  layer, and ``lm_head`` once per generated token; the input embedding is a lookup and costs nothing) and
  ``tokens`` are every prompt token plus every generated token but the last (the last is sampled, never fed
  back);
- attention: ``QK^T`` and ``AV`` cost ``2 * num_heads * head_dim`` FLOPs each per (query, key) pair and layer;
  a sequence whose prompt is ``P`` and output ``O`` tokens has ``sum_{i=1}^{P+O-1} i`` causal pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

THROUGHPUT_KEYS = ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second",
                   "output_tokens_per_second")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs to know about a decoder-only transformer."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelShape":
        """From a ``config.json`` dict (Llama / Mistral / Qwen2 keys)."""
        heads = config["num_attention_heads"]
        return cls(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads", heads),
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"])

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer (q, k, v, o; gate, up, down)."""
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q + kv + o + mlp

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size


def throughput(elapsed_time: float, num_requests: int, prompt_tokens: int, output_tokens: int) -> dict:
    """The ``vllm bench throughput`` keys (plus ``output_tokens_per_second``) of one run."""
    if elapsed_time <= 0:
        raise ValueError(f"elapsed_time={elapsed_time} must be positive")
    total = prompt_tokens + output_tokens
    return {"elapsed_time": elapsed_time, "num_requests": num_requests, "total_num_tokens": total,
            "requests_per_second": num_requests / elapsed_time, "tokens_per_second": total / elapsed_time,
            "output_tokens_per_second": output_tokens / elapsed_time}


def throughput_line(metrics: dict) -> str:
    """The line ``vllm bench throughput`` prints, plus output tokens/s."""
    return (f"Throughput: {metrics['requests_per_second']:.2f} requests/s, {metrics['tokens_per_second']:.2f} "
            f"total tokens/s, {metrics['output_tokens_per_second']:.2f} output tokens/s")


def workload_flops(shape: ModelShape, prompt_lens: list[int], output_lens: list[int]) -> dict:
    """FLOPs of a workload on ``shape``: ``{"linear", "attention", "total"}`` (see the module docstring)."""
    if len(prompt_lens) != len(output_lens):
        raise ValueError("one output length per prompt")
    fed_tokens = sum(p + o - 1 for p, o in zip(prompt_lens, output_lens))
    generated = sum(output_lens)
    linear = 2 * shape.layer_params * shape.num_layers * fed_tokens + 2 * shape.head_params * generated
    pairs = sum((n - 1) * n // 2 for n in (p + o for p, o in zip(prompt_lens, output_lens)))
    attention = 4 * shape.num_heads * shape.head_dim * shape.num_layers * pairs
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def roofline_seconds(total_flops: float, gflops: float) -> float:
    """Seconds the workload takes at ``gflops`` GFLOP/s."""
    if gflops <= 0:
        raise ValueError(f"gflops={gflops} must be positive")
    return total_flops / (gflops * 1e9)


def fraction_of_roofline(elapsed_time: float, roofline_s: float) -> float:
    """The share of the roofline a run reached: roofline time over its time (1.0 = at the roofline)."""
    return roofline_s / elapsed_time


def ratio_matrix(rates: dict[str, float]) -> dict[str, dict[str, float]]:
    """``ratios[a][b] = rates[a] / rates[b]`` for every pair of peers with a positive rate."""
    usable = {name: rate for name, rate in rates.items() if rate and rate > 0}
    return {a: {b: usable[a] / usable[b] for b in usable} for a in usable}


@dataclass(frozen=True)
class Target:
    """A goal of the issue: ``peer``'s output tokens/s at least ``factor`` times ``other``'s (or the roofline's)."""

    peer: str
    other: str          # a peer name, or "roofline"
    factor: float

    def evaluate(self, rates: dict[str, float], fractions: dict[str, float]) -> dict:
        """``{"target", "measured", "met", "margin"}``; ``measured`` None when a side did not run."""
        if self.other == "roofline":
            measured = fractions.get(self.peer)
            label = f"{self.peer} >= {self.factor:g} x roofline"
        else:
            mine, theirs = rates.get(self.peer), rates.get(self.other)
            measured = mine / theirs if mine and theirs else None
            label = f"{self.peer} >= {self.factor:g} x {self.other}"
        if measured is None:
            return {"target": label, "measured": None, "met": None, "margin": None}
        return {"target": label, "measured": measured, "met": measured >= self.factor,
                "margin": measured / self.factor - 1.0}


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are (key, header, format) with format like ``.2f``."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, fmt) if fmt and not isinstance(value, str)
                         else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
