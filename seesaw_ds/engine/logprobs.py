"""Log-probabilities: computed on the sampling rank, shaped for the output records.

As vLLM V1's default ``logprobs_mode="raw_logprobs"``, a logprob is the float32 log_softmax of the model's
own logits, before temperature, penalties and filters, taken from the same logits tensor the token is
sampled from (engine/worker.py). One position gives a `TokenLogprobs`: the chosen token (sampled, or the
prompt's next token) with its logprob and rank, and the k most likely tokens. The leader collects them per
request; `plain_logprobs`, `chat_logprobs` and `completion_logprobs` turn them into vLLM's and OpenAI's
JSON shapes (no tokenizer here: the leader passes each token's text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

#: Rows log-softmaxed at once for prompt logprobs (bounds the float32 copy of a long prompt's logits).
_CHUNK_ROWS = 256
#: JSON has no -inf: a logprob below this is written as this (as vLLM's OpenAI server does).
MIN_LOGPROB = -9999.0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One position's logprobs."""

    token_id: int
    """The chosen token: the sampled one, or for prompt logprobs the prompt's token at this position."""
    logprob: float
    rank: int
    """1 + how many other tokens have a logprob >= the chosen one's (vLLM's rank; 1 = the most likely)."""
    top_ids: tuple[int, ...]
    """The k most likely token ids, most likely first (rank i + 1)."""
    top_logprobs: tuple[float, ...]


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Row i of `logits` [N, V]: the logprob and rank of `token_ids[i]` and the `num_top[i]` best tokens."""
    out: list[TokenLogprobs] = []
    for lo in range(0, logits.shape[0], _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, logits.shape[0])
        logprobs = torch.log_softmax(logits[lo:hi].float(), dim=-1)
        chosen_ids = torch.tensor(token_ids[lo:hi], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, chosen_ids[:, None])
        ranks = (logprobs >= chosen).sum(dim=1)
        k = max(num_top[lo:hi], default=0)
        top = logprobs.topk(k, dim=1) if k else None
        chosen, ranks = chosen.squeeze(1).tolist(), ranks.tolist()
        top_values = top.values.tolist() if top is not None else [[]] * (hi - lo)
        top_indices = top.indices.tolist() if top is not None else [[]] * (hi - lo)
        for row in range(hi - lo):
            count = num_top[lo + row]
            out.append(TokenLogprobs(int(token_ids[lo + row]), chosen[row], ranks[row],
                                     tuple(top_indices[row][:count]), tuple(top_values[row][:count])))
    return out


def token_ids_of(entries: Sequence[TokenLogprobs | None]) -> set[int]:
    """Every token id the entries mention (the leader decodes these)."""
    ids: set[int] = set()
    for entry in entries:
        if entry is not None:
            ids.add(entry.token_id)
            ids.update(entry.top_ids)
    return ids


def _json_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def plain_logprobs(entries: Sequence[TokenLogprobs | None], texts: Mapping[int, str]) -> list[dict | None]:
    """vLLM's shape: per position {"<token id>": {"logprob", "rank", "decoded_token"}}, the chosen token first,
    then the top-k; None stays None (the first prompt token)."""
    shaped: list[dict | None] = []
    for entry in entries:
        if entry is None:
            shaped.append(None)
            continue
        position = {str(entry.token_id): {"logprob": _json_logprob(entry.logprob), "rank": entry.rank,
                                          "decoded_token": texts[entry.token_id]}}
        for index, (token_id, logprob) in enumerate(zip(entry.top_ids, entry.top_logprobs)):
            position.setdefault(str(token_id), {"logprob": _json_logprob(logprob), "rank": index + 1,
                                                "decoded_token": texts[token_id]})
        shaped.append(position)
    return shaped


def _chat_token(token_id: int, logprob: float, texts: Mapping[int, str]) -> dict:
    text = texts[token_id]
    return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: Mapping[int, str]) -> dict:
    """OpenAI chat's `choices[i].logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    return {"content": [{**_chat_token(e.token_id, e.logprob, texts),
                         "top_logprobs": [_chat_token(t, lp, texts) for t, lp in zip(e.top_ids, e.top_logprobs)]}
                        for e in entries]}


def completion_logprobs(entries: Sequence[TokenLogprobs], texts: Mapping[int, str]) -> dict:
    """OpenAI completions' `choices[i].logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}; each
    top_logprobs entry maps token text to logprob for the chosen token and the top-k (up to k + 1 entries)."""
    tokens = [texts[e.token_id] for e in entries]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = []
    for entry in entries:
        position = {texts[entry.token_id]: _json_logprob(entry.logprob)}
        for token_id, logprob in zip(entry.top_ids, entry.top_logprobs):
            position.setdefault(texts[token_id], _json_logprob(logprob))
        top.append(position)
    return {"tokens": tokens, "token_logprobs": [_json_logprob(e.logprob) for e in entries], "top_logprobs": top,
            "text_offset": offsets}
