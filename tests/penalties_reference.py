"""The per-row penalties and filters as they were before they were batched (engine/penalties.py at 921c4df),
kept verbatim as the reference the batched ones must equal bit for bit."""
from __future__ import annotations

from typing import Sequence

import torch

from seesaw_ds.engine.penalties import PenaltyParams, TokenHistory, needs_history, needs_processing


def _ban_bad_words(row: torch.Tensor, words: Sequence[Sequence[int]], output: Sequence[int]) -> None:
    """A word's last token is banned when the output ends with the word's other tokens (vLLM: output only)."""
    for ids in words:
        prefix_length = len(ids) - 1
        if prefix_length > len(output):
            continue
        if prefix_length == 0 or list(output[-prefix_length:]) == list(ids[:-1]):
            if ids[-1] < row.shape[0]:
                row[ids[-1]] = float("-inf")


def reference_apply_penalties_and_filters(logits: torch.Tensor, params: Sequence[PenaltyParams],
                                histories: Sequence[TokenHistory | None]) -> torch.Tensor:
    """Apply each row's bad words, logit_bias and penalties to float32 `logits` [N, V] in place; returns it.

    vLLM's definitions: presence and frequency penalties count output tokens only (subtract `presence` once
    per distinct token, `frequency` per occurrence); the repetition penalty covers prompt and output tokens,
    dividing positive logits and multiplying negative ones. A row that needs a history must have one.
    """
    vocab_size = logits.shape[1]
    device = logits.device
    for index, (p, history) in enumerate(zip(params, histories)):
        if not needs_processing(p):
            continue
        row = logits[index]
        if needs_history(p) and history is None:
            raise ValueError(f"row {index}: penalties or bad_words need the sequence's token history")
        if p.bad_words:
            _ban_bad_words(row, history.bad_words_token_ids, history.output)
        if p.logit_bias:
            pairs = [(token, bias) for token, bias in p.logit_bias if token < vocab_size]
            if pairs:
                ids = torch.tensor([token for token, _ in pairs], dtype=torch.long, device=device)
                row[ids] += torch.tensor([bias for _, bias in pairs], dtype=row.dtype, device=device)
        if p.repetition_penalty != 1.0:
            seen = history.seen_ids(device)
            seen = seen[seen < vocab_size]
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and history.output:
            ids, counts = torch.tensor(history.output, dtype=torch.long, device=device).unique(return_counts=True)
            keep = ids < vocab_size
            ids, counts = ids[keep], counts[keep].to(row.dtype)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return logits
