"""The next-token draw: seeds, the logits processors in order and a batch-independent sample.

`request_seed` / `sample_seed` give every request (and each of its n samples) its own seed; `draw_uniform`
turns (seed, step) into the uniform number that picks the token, so a request's draw depends only on its own
seed, step and logits, never on batch composition, row order or the rank that runs it. `sample_next_tokens`
applies grammar masks, bans (min_tokens), penalties and filters (engine/penalties.py), then greedy or
temperature / min-p / top-k / top-p sampling.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from seesaw_ds.engine.params import SamplingParams
from seesaw_ds.engine.penalties import TokenHistory, apply_penalties_and_filters, needs_processing
from seesaw_ds.model import kernels

_MASK64 = (1 << 64) - 1
#: Candidate counts tried when looking for the top-p nucleus before falling back to the whole vocabulary.
_TOP_P_CANDIDATES = (128, 2048)
_MIN_TEMPERATURE = 1e-6


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def draw_uniform(seed: int, step: int) -> float:
    """The uniform number in [0, 1) that decides a request's token at `step`: a stable function of both."""
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (mixed >> 11) * 2.0 ** -53


def _hash63(text: str) -> int:
    """A stable non-negative 63-bit hash of ``text`` (a seed every rank derives alike)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def request_seed(job_seed: int, custom_id: str, seed: int | None) -> int:
    """The request's own seed if given, else a stable 63-bit hash of (job_seed, custom_id)."""
    return seed if seed is not None else _hash63(f"{job_seed}\x00{custom_id}")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` (0..n-1) of a request whose seed is `seed` (`request_seed`): sample 0 keeps
    `seed` itself (an n=1 request draws as before), sample i > 0 a stable 63-bit hash of (seed, i), so each
    sample depends only on the request, never on the layout, replica or batch."""
    return seed if index == 0 else _hash63(f"{seed}\x00sample\x00{index}")


def _apply_bans(logits: torch.Tensor, banned: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """Float32 logits with the banned ids of each row set to -inf (a copy only when something is banned)."""
    num_rows, vocab_size = logits.shape
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in enumerate(banned or ()):
        kept = [t for t in ids if 0 <= t < vocab_size]
        rows.extend([row] * len(kept))
        cols.extend(kept)
    if not rows:
        return logits.float()
    out = logits.to(torch.float32, copy=True)
    out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = float("-inf")
    return out


def apply_token_bitmasks(logits: torch.Tensor, bitmasks: Sequence[Any] | None) -> torch.Tensor:
    """Float32 logits with the tokens each row's grammar forbids set to -inf (a copy when a row has a mask).

    `bitmasks[i]` is None (row unconstrained) or xgrammar's packed mask (engine/grammar.py): int32 words,
    bit j of word i allows token 32 * i + j. Columns past the mask's width are forbidden. The masking is
    xgrammar's `apply_token_bitmask_inplace` (imported here only when a row has a mask): its C++ kernel on a
    CPU, its plain-torch one on an accelerator (no Triton JIT build on a sampling rank).
    """
    rows = [i for i, mask in enumerate(bitmasks or ()) if mask is not None]
    if not rows:
        return logits.float()
    import xgrammar

    num_rows, num_cols = logits.shape
    words = -(-num_cols // 32)
    packed = np.full((num_rows, words), -1, dtype=np.int32)  # rows without a mask: every bit set
    for row in rows:
        mask = np.asarray(bitmasks[row], dtype="<i4")[:words]
        packed[row, :len(mask)] = mask
        packed[row, len(mask):] = 0  # past the mask's width: forbidden
    out = logits.to(torch.float32, copy=True)
    xgrammar.apply_token_bitmask_inplace(out, torch.from_numpy(packed).to(out.device), vocab_size=num_cols,
                                         indices=rows, backend="cpu" if out.device.type == "cpu" else "torch_native")
    return out


def _select(tensor: torch.Tensor, rows: list[int], num_rows: int) -> torch.Tensor:
    """tensor[rows] without the copy when rows are all of them, in order."""
    return tensor if len(rows) == num_rows else tensor[torch.tensor(rows, device=tensor.device)]


def _nucleus_cuts(weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest weight top-p keeps: that of the first sorted token whose mass reaches p.

    Only the largest few candidates are sorted (a full sort of 32k columns is slow); rows whose nucleus is
    wider fall back to more candidates. Prefix sums do not depend on the candidate count, so neither does
    the result. A row whose mass never reaches p (rounding) keeps everything.
    """
    num_rows, vocab_size = weights.shape
    norm = weights.sum(dim=1, keepdim=True)
    cuts = torch.zeros(num_rows, dtype=weights.dtype, device=weights.device)
    pending = list(range(num_rows))
    for num_candidates in (*_TOP_P_CANDIDATES, vocab_size):
        count = min(num_candidates, vocab_size)
        index = torch.tensor(pending, device=weights.device)
        values = _select(weights, pending, num_rows).topk(count, dim=1).values
        cumulative = (values / norm[index]).cumsum(dim=1)
        wanted = top_p[index, None]
        reached = (cumulative[:, -1:] >= wanted).squeeze(1)
        # Done when reached, or when there is nothing beyond the candidates (all of the support seen).
        final = reached | (values[:, -1] == 0) | (count == vocab_size)
        position = (cumulative < wanted).sum(dim=1).clamp_(max=count - 1)
        cut = torch.where(reached, values.gather(1, position[:, None]).squeeze(1), 0.0)
        cuts[index[final]] = cut[final]
        pending = index[~final].tolist()
        if not pending:
            break
    return cuts


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float]
                 ) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p, then an inverse-CDF draw in token-id order, row by row in effect.

    Works on unnormalised weights exp((logit - max) / T) in [0, 1]: one exp for all three steps.
    """
    num_rows, vocab_size = logits.shape
    device = logits.device
    # Clamped so that a tiny temperature cannot underflow to 0 in float32 (0/0 = NaN): it acts as greedy.
    temperature = torch.tensor([max(p.temperature, _MIN_TEMPERATURE) for p in params], device=device)
    weights = (logits - logits.max(dim=1, keepdim=True).values).div_(temperature[:, None]).exp_()

    # min_p first (as vLLM): the largest weight is exactly 1, so a weight is a probability over the largest one.
    min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if min_p_rows:
        cuts = torch.zeros((num_rows, 1), device=device)
        cuts[torch.tensor(min_p_rows, device=device), 0] = torch.tensor([params[i].min_p for i in min_p_rows],
                                                                       device=device)
        weights.masked_fill_(weights < cuts, 0.0)

    top_k_rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab_size]
    if top_k_rows:
        ks = torch.tensor([params[i].top_k for i in top_k_rows], device=device)
        kth = _select(weights, top_k_rows, num_rows).topk(int(ks.max()), dim=1).values.gather(1, ks[:, None] - 1)
        cuts = torch.zeros((num_rows, 1), device=device)
        cuts[torch.tensor(top_k_rows, device=device)] = kth
        weights.masked_fill_(weights < cuts, 0.0)

    top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if top_p_rows:
        top_p = torch.tensor([params[i].top_p for i in top_p_rows], device=device)
        cuts = torch.zeros((num_rows, 1), device=device)
        cuts[torch.tensor(top_p_rows, device=device), 0] = _nucleus_cuts(_select(weights, top_p_rows, num_rows), top_p)
        weights.masked_fill_(weights < cuts, 0.0)

    # Inverse CDF over token ids in their natural order: row-local, so batch-independent.
    cdf = weights.cumsum(dim=1)
    total = cdf[:, -1:]
    target = torch.tensor(uniforms, dtype=cdf.dtype, device=device)[:, None] * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab_size - 1)


def argmax_suffices(params: Sequence[SamplingParams], banned: Iterable[Sequence[int]] | None = None,
                    token_bitmasks: Iterable[Any] | None = None) -> bool:
    """Whether every row's next token is its logits' argmax and nothing else: each greedy with nothing to
    process (penalties, bias, bad words), no bans, no grammar mask (pure). The worker asks it before the
    forward (the logits may then stay in the model's dtype), :func:`sample_next_tokens` after."""
    return all(p.greedy and not needs_processing(p) for p in params) and not any(banned or ()) \
        and not any(mask is not None for mask in token_bitmasks or ())


def sample_next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
                       steps: Sequence[int], banned: Sequence[Sequence[int]] | None = None,
                       histories: Sequence[TokenHistory | None] | None = None,
                       token_bitmasks: Sequence[Any] | None = None) -> torch.Tensor:
    """Next token for each row of `logits` [N, V]; returns a long tensor [N]. `logits` is not modified.

    A row's grammar (`token_bitmasks[i]`, structured output: `apply_token_bitmasks`) forbids tokens first.

    `banned[i]` ids are excluded (used for min_tokens); bad words, logit_bias and penalties then apply
    (engine/penalties.py; `histories[i]` is row i's token history, needed when its penalties read one).
    Greedy rows (temperature 0) take the argmax. Other rows apply temperature, min-p, top-k and top-p, then
    draw with `draw_uniform(seeds[i], steps[i])`, so a row's token depends only on its logits, history, seed
    and step. `steps[i]` is the index of the token being drawn.
    """
    num_rows = logits.shape[0]
    if not len(params) == len(seeds) == len(steps) == num_rows or (banned is not None and len(banned) != num_rows):
        raise ValueError(f"sample_next_tokens: {num_rows} logit rows but {len(params)} params, {len(seeds)} "
                         f"seeds, {len(steps)} steps, {None if banned is None else len(banned)} banned lists")
    if logits.dtype != torch.float32:  # the model's dtype (Executor.forward's argmax_only): for argmax rows
        if argmax_suffices(params, banned, token_bitmasks):
            return kernels.argmax(logits)
        logits = logits.float()
    processed = _apply_bans(apply_token_bitmasks(logits, token_bitmasks), banned)
    if any(needs_processing(p) for p in params):
        processed = apply_penalties_and_filters(processed.clone() if processed is logits else processed, params,
                                                histories if histories is not None else [None] * num_rows)
    logits = processed
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return logits.argmax(dim=1)
    if len(sampled) == num_rows:
        return _sample_rows(logits, params, [draw_uniform(seeds[i], steps[i]) for i in range(num_rows)])
    tokens = logits.argmax(dim=1)
    rows = torch.tensor(sampled, device=logits.device)
    tokens[rows] = _sample_rows(logits[rows], [params[i] for i in sampled],
                                [draw_uniform(seeds[i], steps[i]) for i in sampled])
    return tokens
