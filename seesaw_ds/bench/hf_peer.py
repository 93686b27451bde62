"""The plain-transformers peer: ``model.generate`` over batches of the workload, in its own process.

    python -m seesaw_ds.bench.hf_peer REQUEST.json RESULT.json

REQUEST: ``{"model", "workload" (Workload.to_json() file), "threads", "batch_size" (int or "auto"),
"search_candidates", "search_prompts", "search_output_len"}``. Prompts are sorted by length (longest first)
and cut into batches, left-padded: what a user of transformers would do to limit padding. Each batch
generates greedily, exactly ``max(output_len)`` new tokens (``min_new_tokens`` = ``max_new_tokens``: eos
cannot stop it, as ``ignore_eos``); a batch's requests all share one output length in the benchmark's
presets with fixed outputs; otherwise tokens past a request's own length are generated and not counted,
which is the cost padding has for this peer. ``batch_size: auto`` times a short run of each candidate on the
first ``search_prompts`` prompts (``search_output_len`` outputs each) and keeps the fastest.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PREFIX_TOKENS = 128  # output tokens kept per request to compare peers (the standard workload's length)
"""Leading output tokens kept per request to check that the peers generated the same text."""


def _generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """Generate ``new_tokens`` for every prompt in one left-padded batch; returns each row's new tokens."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    made = out.shape[1] - width
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} tokens, expected {new_tokens}")
    return out[:, width:].tolist()


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def search_batch_size(model, prompts, candidates, num_prompts: int, new_tokens: int, pad_id: int) -> dict:
    """Output tokens/s of each candidate batch size on the first ``num_prompts`` prompts (a random sample of
    the workload's lengths), sorted by length as in the real run, with ``new_tokens`` outputs each."""
    longest = sorted(prompts[:num_prompts], key=len, reverse=True)
    rates = {}
    for batch_size in candidates:
        began = time.perf_counter()
        made = sum(len(row) for i in range(0, len(longest), batch_size)
                   for row in _generate(model, longest[i:i + batch_size], new_tokens, pad_id))
        rates[batch_size] = made / (time.perf_counter() - began)
    return rates


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(request["threads"]))
    workload = json.loads(Path(request["workload"]).read_text())
    prompts, output_lens = workload["prompts"], workload["output_lens"]
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=getattr(torch, request.get("dtype", "float32"))
                                                 ).eval()
    pad_id = model.generation_config.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    result = {"threads": torch.get_num_threads(), "sorted_by_length": True}
    batch_size = request.get("batch_size", "auto")
    with torch.inference_mode():
        if batch_size == "auto":
            candidates = [int(c) for c in request.get("search_candidates", [16, 32, 64])]
            rates = search_batch_size(model, prompts, candidates, int(request.get("search_prompts", 64)),
                                      int(request.get("search_output_len", 32)), pad_id)
            batch_size = max(rates, key=rates.get)
            result["search_output_tokens_per_second"] = {str(k): v for k, v in rates.items()}
        batch_size = int(batch_size)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        counted, prefixes = 0, {}
        began = time.perf_counter()
        for batch in _batches(order, batch_size):
            new_tokens = max(output_lens[i] for i in batch)
            rows = _generate(model, [prompts[i] for i in batch], new_tokens, pad_id)
            counted += sum(output_lens[i] for i in batch)
            prefixes.update({str(i): row[:PREFIX_TOKENS] for i, row in zip(batch, rows)})
        elapsed = time.perf_counter() - began
    result.update({"batch_size": batch_size, "elapsed_time": elapsed, "num_requests": len(prompts),
                   "prompt_tokens": sum(len(p) for p in prompts), "output_tokens": counted,
                   "token_prefixes": prefixes})
    Path(argv[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
