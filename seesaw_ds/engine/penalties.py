"""Penalties and filters on one step's logits (vLLM's definitions), and the token history they read.

This module owns:

- `TokenHistory`: a sequence's prompt ids and generated ids, which every rank of an instance keeps for the
  sequences whose penalties need them (the sampling rank changes with the layout; see engine/worker.py);
- `bad_words_token_ids`: vLLM's tokenization of `bad_words` (each word with and without a leading space);
- `apply_penalties_and_filters`: bad words, logit_bias, then the repetition, frequency and presence
  penalties, in vLLM V1's order, on float32 logits in place.

`min_p` acts after temperature, so it lives with the draw (engine/draw.py). A row is processed from its
own logits, parameters and history only, so the result never depends on the batch or the layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch


class PenaltyParams(Protocol):
    """The fields of a request's sampling parameters that penalties and filters read (engine/params.py's
    `SamplingParams` has them; this module does not import it, so the draw can import this one)."""

    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    bad_words: Sequence[str]
    logit_bias: Sequence[tuple[int, float]]


@dataclass
class TokenHistory:
    """The tokens one sequence's penalties look at."""

    prompt: list[int]
    """The prompt's token ids."""
    output: list[int] = field(default_factory=list)
    """The ids generated so far, in order."""
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """The request's bad_words as token id sequences (`bad_words_token_ids`)."""
    _prompt_unique: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def seen_ids(self, device: torch.device) -> torch.Tensor:
        """Distinct ids of the prompt and the output (the repetition penalty's set)."""
        if self._prompt_unique is None or self._prompt_unique.device != device:
            self._prompt_unique = torch.tensor(sorted(set(self.prompt)), dtype=torch.long, device=device)
        if not self.output:
            return self._prompt_unique
        output = torch.tensor(self.output, dtype=torch.long, device=device)
        return torch.cat([self._prompt_unique, output]).unique()


def needs_history(params: PenaltyParams) -> bool:
    """True when the request's sampling reads its token history (penalties, bad words)."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0 or bool(params.bad_words))


def needs_processing(params: PenaltyParams) -> bool:
    """True when `apply_penalties_and_filters` changes this request's logits."""
    return needs_history(params) or bool(params.logit_bias)


def bad_words_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word tokenized as vLLM does: without a leading space, and with one when that gives another
    first token in as many tokens (so the word is banned at the start of the text and after a space)."""
    sequences: list[list[int]] = []
    for word in words:
        plain: list[int] | None = None
        for prefix in ("", " "):
            ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                continue
            if plain is None:
                plain = ids
                sequences.append(ids)
            elif ids[0] != plain[0] and len(ids) == len(plain):
                sequences.append(ids)
    return tuple(tuple(ids) for ids in sequences)


def _ban_bad_words(row: torch.Tensor, words: Sequence[Sequence[int]], output: Sequence[int]) -> None:
    """A word's last token is banned when the output ends with the word's other tokens (vLLM: output only)."""
    for ids in words:
        prefix_length = len(ids) - 1
        if prefix_length > len(output):
            continue
        if prefix_length == 0 or list(output[-prefix_length:]) == list(ids[:-1]):
            if ids[-1] < row.shape[0]:
                row[ids[-1]] = float("-inf")


def apply_penalties_and_filters(logits: torch.Tensor, params: Sequence[PenaltyParams],
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
