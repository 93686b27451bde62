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

import numpy as np
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
    _prompt_unique_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def seen_id_array(self, vocab_size: int) -> np.ndarray:
        """Distinct ids below ``vocab_size`` of the prompt and the output (int64), for the batched penalties."""
        if self._prompt_unique_array is None:
            self._prompt_unique_array = np.unique(np.asarray(self.prompt, dtype=np.int64))
        ids = np.concatenate([self._prompt_unique_array, np.asarray(self.output, dtype=np.int64)])
        return ids[ids < vocab_size]

    def output_id_array(self, vocab_size: int) -> np.ndarray:
        """The output's ids below ``vocab_size`` (int64, every occurrence)."""
        ids = np.asarray(self.output, dtype=np.int64)
        return ids[ids < vocab_size]

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


def _bad_word_bans(words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The last token of each word whose other tokens end the output (vLLM: the output only)."""
    banned = []
    for ids in words:
        prefix_length = len(ids) - 1
        if prefix_length > len(output):
            continue
        if prefix_length == 0 or list(output[-prefix_length:]) == list(ids[:-1]):
            banned.append(ids[-1])
    return banned


def _distinct(keys: np.ndarray, *, counts: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The distinct values of ``keys`` in order (and how often each occurs): sorted, then run boundaries
    (faster here than np.unique, which hashes)."""
    keys = np.sort(keys)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], (np.diff(np.append(starts, len(keys))) if counts else None)


def _row_groups(keys: np.ndarray, vocab_size: int, value_of_row: dict[int, object],
                device: torch.device) -> list[tuple[object, torch.Tensor | None]]:
    """Positions of ``keys`` (row * vocab_size + token) grouped by their row's value (None: all of them, when
    every row has the same), so that each group is computed with Python scalars exactly as one row at a time
    would be."""
    groups: dict[object, list[int]] = {}
    for row, value in value_of_row.items():
        groups.setdefault(value, []).append(row)
    if len(groups) == 1:
        return [(next(iter(groups)), None)]
    rows = keys // vocab_size
    return [(value, torch.from_numpy(np.flatnonzero(np.isin(rows, members))).to(device))
            for value, members in groups.items()]


def apply_penalties_and_filters(logits: torch.Tensor, params: Sequence[PenaltyParams],
                                histories: Sequence[TokenHistory | None]) -> torch.Tensor:
    """Apply each row's bad words, logit_bias and penalties to float32 `logits` [N, V] in place; returns it.

    vLLM's definitions: presence and frequency penalties count output tokens only (subtract `presence` once
    per distinct token, `frequency` per occurrence); the repetition penalty covers prompt and output tokens,
    dividing positive logits and multiplying negative ones. A row that needs a history must have one.

    Batched: each of the four steps is one indexed update over every row that asks for it (rows with the
    same penalty value computed together, with the same float32 operations a row at a time would do), so
    the cost no longer grows with a Python loop of tensor calls per row.
    """
    vocab_size = logits.shape[1]
    device = logits.device
    if not logits.is_contiguous():
        raise ValueError("apply_penalties_and_filters needs contiguous logits (it indexes them flat)")
    rows = [index for index, p in enumerate(params) if needs_processing(p)]
    for index in rows:
        if needs_history(params[index]) and histories[index] is None:
            raise ValueError(f"row {index}: penalties or bad_words need the sequence's token history")
    if not rows:
        return logits
    banned = [(index, token) for index in rows if params[index].bad_words
              for token in _bad_word_bans(histories[index].bad_words_token_ids, histories[index].output)
              if token < vocab_size]
    if banned:
        logits[torch.tensor([r for r, _ in banned], device=device),
               torch.tensor([t for _, t in banned], device=device)] = float("-inf")
    biased = [(index, token, bias) for index in rows for token, bias in params[index].logit_bias if token < vocab_size]
    if biased:
        logits[torch.tensor([r for r, _, _ in biased], device=device),
               torch.tensor([t for _, t, _ in biased], device=device)] += torch.tensor(
                   [b for _, _, b in biased], dtype=logits.dtype, device=device)
    flat = logits.view(-1)  # one index per (row, token): row * vocab_size + token
    repeating = [index for index in rows if params[index].repetition_penalty != 1.0]
    if repeating:
        keys, _ = _distinct(np.concatenate([index * vocab_size + histories[index].seen_id_array(vocab_size)
                                            for index in repeating]))
        index = torch.from_numpy(keys).to(device)
        values = flat[index]
        updated = values
        for penalty, at in _row_groups(keys, vocab_size, {i: params[i].repetition_penalty for i in repeating}, device):
            chosen = values if at is None else values[at]
            result = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
            if at is None:
                updated = result
            else:
                updated = updated.clone() if updated is values else updated
                updated[at] = result
        flat[index] = updated
    counting = [index for index in rows if (params[index].frequency_penalty or params[index].presence_penalty)
                and histories[index].output]
    if counting:
        keys, times = _distinct(np.concatenate([index * vocab_size + histories[index].output_id_array(vocab_size)
                                                for index in counting]), counts=True)
        counts = torch.from_numpy(times).to(device=device, dtype=logits.dtype)
        delta = torch.empty_like(counts)
        pairs = {i: (params[i].frequency_penalty, params[i].presence_penalty) for i in counting}
        for (frequency, presence), at in _row_groups(keys, vocab_size, pairs, device):
            if at is None:
                delta = frequency * counts + presence
            else:
                delta[at] = frequency * counts[at] + presence
        flat[torch.from_numpy(keys).to(device)] -= delta
    return logits
