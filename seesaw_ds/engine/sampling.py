"""Per-request sampling: parameters, their defaults, the next-token draw and the stop decision.

This module owns everything about *which* token a request gets next and *when* it is finished:

- `SamplingParams` (vLLM names) and `resolve_sampling`, which layers built-in defaults, the model's
  generation config, the job-wide `sampling.*` config and the request's own keys, validating each value;
- `request_seed` and `sample_next_tokens`, which make a request's draw depend only on its own seed, its step
  index and its own logits, never on batch composition, row order or the rank that runs it;
- `StopChecker`, which detokenizes incrementally and decides `"stop"` / `"length"`.

Nothing here knows about processes, layouts or files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from seesaw_ds.engine.penalties import TokenHistory, apply_penalties_and_filters, needs_processing

_MASK64 = (1 << 64) - 1
#: Prompt tokens decoded before the first generated one, so that its leading space is right (as vLLM).
_DETOKENIZE_CONTEXT_TOKENS = 5
#: Candidate counts tried when looking for the top-p nucleus before falling back to the whole vocabulary.
_TOP_P_CANDIDATES = (128, 2048)
_MIN_TEMPERATURE = 1e-6


class RequestError(ValueError):
    """A request (or a job-wide default) carries a value the engine cannot honour; the message says why."""


def _describe(key: str, value: Any, allowed: str) -> str:
    return f"invalid sampling value {key}={value!r} ({type(value).__name__}): {allowed}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int, allowed: str) -> int:
    if not _is_int(value) or value < minimum:
        raise RequestError(_describe(key, value, allowed))
    return value


def _check_int_range(key: str, value: Any, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(_describe(key, value, f"must be an integer in [{low}, {high}]"))
    return value


def _check_float(key: str, value: Any, ok, allowed: str) -> float:
    try:
        number = float(value) if _is_int(value) or isinstance(value, float) else math.nan
    except OverflowError:  # an integer too large for a float
        number = math.nan
    if not math.isfinite(number) or not ok(number):
        raise RequestError(_describe(key, value, allowed))
    return number


def _check_stop(key: str, value: Any) -> tuple[str, ...]:
    allowed = "must be a non-empty string or a list of non-empty strings"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise RequestError(_describe(key, value, allowed))
    return tuple(items)


def _check_token_ids(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in value):
        raise RequestError(_describe(key, value, "must be a list of token ids (integers >= 0)"))
    return tuple(value)


def _check_top_k(key: str, value: Any) -> int:
    if not _is_int(value) or value < -1:
        raise RequestError(_describe(key, value, "must be an integer: -1 or 0 (off) or >= 1"))
    return value


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(_describe(key, value, "must be true or false"))
    return value


def _check_seed(key: str, value: Any) -> int | None:
    if value is not None and not (_is_int(value) and -2 ** 63 <= value < 2 ** 63):
        raise RequestError(_describe(key, value, "must be a 64-bit signed integer or null"))
    return value


#: Most top-k logprobs a request may ask for (vLLM's default `max_logprobs`; OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20
#: logit_bias values are clamped to this range by OpenAI; here a value outside it is an error.
MAX_LOGIT_BIAS = 100.0
#: Most samples (`n`) one request may ask for; each is its own sequence in the decode tier.
MAX_SAMPLES = 128


def _check_logprobs(key: str, value: Any) -> int | None:
    if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
        raise RequestError(_describe(key, value, f"must be an integer in [0, {MAX_LOGPROBS}] (how many top "
                                                 "tokens beside the chosen one) or null (off)"))
    return value


def _check_logit_bias(key: str, value: Any) -> tuple[tuple[int, float], ...]:
    """{token id (int, or its decimal string as JSON keys are): bias in [-100, 100]} -> sorted (id, bias) pairs."""
    allowed = (f"must be an object {{token id: bias}} with token ids >= 0 (integers or their decimal strings) "
               f"and biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, (list, tuple, type({}.items()))):
        raise RequestError(_describe(key, value, allowed))
    pairs: dict[int, float] = {}
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise RequestError(_describe(key, value, allowed))
        token, bias = item
        if isinstance(token, str) and token.strip().isdigit():
            token = int(token)
        if not (_is_int(token) and token >= 0):
            raise RequestError(_describe(key, value, allowed))
        pairs[token] = _check_float(f"{key}[{item[0]!r}]", bias, lambda x: abs(x) <= MAX_LOGIT_BIAS, allowed)
    return tuple(sorted(pairs.items()))


def _check_bad_words(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in value):
        raise RequestError(_describe(key, value, "must be a list of non-blank strings"))
    return tuple(value)


_CHECKS = MappingProxyType({
    "n": lambda k, v: _check_int_range(k, v, 1, MAX_SAMPLES),
    "max_tokens": lambda k, v: _check_int(k, v, 1, "must be an integer >= 1"),
    "min_tokens": lambda k, v: _check_int(k, v, 0, "must be an integer >= 0 and <= max_tokens"),
    "temperature": lambda k, v: _check_float(k, v, lambda x: x >= 0, "must be a number >= 0 (0 = greedy)"),
    "top_p": lambda k, v: _check_float(k, v, lambda x: 0 < x <= 1, "must be a number in (0, 1]"),
    "top_k": _check_top_k,
    "seed": _check_seed,
    "stop": _check_stop,
    "stop_token_ids": _check_token_ids,
    "ignore_eos": _check_bool,
    "presence_penalty": lambda k, v: _check_float(k, v, lambda x: -2 <= x <= 2, "must be a number in [-2, 2]"),
    "frequency_penalty": lambda k, v: _check_float(k, v, lambda x: -2 <= x <= 2, "must be a number in [-2, 2]"),
    "repetition_penalty": lambda k, v: _check_float(k, v, lambda x: x > 0, "must be a number > 0 (1 = off)"),
    "min_p": lambda k, v: _check_float(k, v, lambda x: 0 <= x <= 1, "must be a number in [0, 1] (0 = off)"),
    "logit_bias": _check_logit_bias,
    "bad_words": _check_bad_words,
    "logprobs": _check_logprobs,
    "prompt_logprobs": _check_logprobs,
})

#: generation_config.json keys that seed the defaults (as vLLM's `generation_config="auto"`), and their names here.
MODEL_DEFAULT_KEYS = MappingProxyType({"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                                       "max_new_tokens": "max_tokens"})


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; vLLM's names and meanings. Validated on construction (`RequestError`).

    `stop` and `stop_token_ids` are stored as tuples (a single stop string is wrapped) so the object is
    immutable and hashable.
    """

    max_tokens: int = 16
    """Most tokens to generate (the finishing eos/stop token included)."""
    min_tokens: int = 0
    """Tokens generated before eos, stop_token_ids or stop strings may finish the request."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose mass reaches top_p (at least one)."""
    top_k: int = -1
    """Keep the top_k most likely tokens (ties at the k-th value are all kept); -1 or 0 is off."""
    seed: int | None = None
    """The request's own seed; None means one is derived from the job seed and the custom_id."""
    stop: tuple[str, ...] = ()
    """Strings that end the output; the text is cut before the first one found."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the output (kept in token_ids, left out of text)."""
    ignore_eos: bool = False
    """Keep generating past eos (until max_tokens or another stop condition)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token that already occurs in the output (not the prompt)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output (not the prompt)."""
    repetition_penalty: float = 1.0
    """Tokens seen in the prompt or output: positive logits divided by it, negative ones multiplied."""
    min_p: float = 0.0
    """Drop tokens whose probability (after temperature) is below min_p times the largest one."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits (OpenAI's {token id: bias}, biases in [-100, 100])."""
    bad_words: tuple[str, ...] = ()
    """Words never generated (vLLM: tokenized with and without a leading space; see engine/penalties.py)."""
    logprobs: int | None = None
    """Return each generated token's logprob and the top-k logprobs beside it (None = off)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob and the top-k beside it (the first token has none; None = off)."""
    n: int = 1
    """Completions of the prompt (vLLM/OpenAI `n`): the prompt is prefilled once, each sample decodes on its
    own with its own seed (`sample_seed`); with temperature 0 all n are the same greedy text."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _CHECKS[field.name](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        if self.min_tokens > self.max_tokens:
            raise RequestError(f"invalid sampling values: min_tokens={self.min_tokens} must be <= "
                               f"max_tokens={self.max_tokens}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax."""
        return self.temperature == 0.0


SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _layer(values: dict, source: Mapping[str, Any], prefix: str, *, skip: Iterable[str] = ()) -> None:
    for key, value in source.items():
        if key not in _CHECKS:
            raise RequestError(f"unknown sampling key '{prefix}{key}'; allowed keys: {', '.join(SAMPLING_KEYS)}")
        if value is None or key in skip:
            continue
        values[key] = _CHECKS[key](prefix + key, value)


def resolve_sampling(model_defaults: Mapping[str, Any], job_defaults: Mapping[str, Any],
                     request: Mapping[str, Any]) -> SamplingParams:
    """Layer built-in < model generation_config < job `sampling.*` < request keys; validate each value.

    `model_defaults` is the model's generation_config (only temperature, top_p, top_k and max_new_tokens
    are taken; the rest is ignored). In `job_defaults` and `request` a value of None means "not set" and an
    unknown key is an error. The job-wide `seed` is the *job* seed (see `request_seed`), not a per-request
    seed, so it is validated here but not copied into the result. Raises `RequestError`.
    """
    values: dict[str, Any] = {}
    model_values = {MODEL_DEFAULT_KEYS[k]: v for k, v in model_defaults.items() if k in MODEL_DEFAULT_KEYS}
    for key, value in model_values.items():
        if value is not None:
            values[key] = _CHECKS[key](f"generation_config.{key}", value)
    _layer(values, job_defaults, "sampling.", skip=("seed",))
    _layer(values, request, "")
    return SamplingParams(**values)


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


def eos_token_ids(tokenizer: Any, generation_config: Mapping[str, Any] | None = None) -> list[int]:
    """The ids that mean end-of-sequence: the tokenizer's eos plus generation_config's eos_token_id(s)."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None), (generation_config or {}).get("eos_token_id")]
    for value in candidates:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if _is_int(token_id) and token_id not in ids:
                ids.append(token_id)
    return ids


class StopChecker:
    """Follows one request's generated tokens: incremental text and the finish decision (vLLM semantics).

    `append(token_id)` returns the finish reason once the request is done: "stop" for eos (unless
    ignore_eos), a stop_token_id or a stop string; "length" at max_tokens. Eos and stop token ids are kept in
    `token_ids` but left out of `text`; a stop string and everything after it are cut from `text` (the
    tokens that formed it stay in `token_ids`). Nothing stops the request before min_tokens tokens.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: Iterable[int] = (),
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        # Detokenization window (vLLM's prefix/read offsets) over prompt context + generated ids.
        self._window_ids = list(prompt_token_ids[-_DETOKENIZE_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that finished the request (None for eos or length)."""

    @property
    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None

    def banned_token_ids(self) -> list[int]:
        """Ids the next draw must avoid: eos and stop_token_ids until min_tokens tokens exist."""
        if len(self.token_ids) >= self._params.min_tokens:
            return []
        return sorted(self._eos_ids | self._stop_ids)

    def append(self, token_id: int) -> str | None:
        """Take the next generated token; return the finish reason if this token finishes the request."""
        if self.finished:
            raise RuntimeError(f"token {token_id} appended after the request finished ({self.finish_reason})")
        may_stop = len(self.token_ids) >= self._params.min_tokens
        self.token_ids.append(token_id)
        if may_stop and (token_id in self._eos_ids or token_id in self._stop_ids):
            self._flush()
            is_eos = token_id in self._eos_ids
            return self._finish("stop", None if is_eos else token_id)
        self._window_ids.append(token_id)
        new_chars = self._decode_step()
        if new_chars and len(self.token_ids) >= self._params.min_tokens and self._find_stop(new_chars):
            return self.finish_reason
        if len(self.token_ids) >= self._params.max_tokens:
            new_chars = self._flush()
            if new_chars and self._find_stop(new_chars):
                return self.finish_reason
            return self._finish("length", None)
        return None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> str:
        """End the request for a reason decided elsewhere (its grammar is complete: "stop"); text is flushed."""
        if not self.finished:
            self._flush()
            self._finish(reason, stop_reason)
        return self.finish_reason

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_step(self) -> int:
        """Commit the text the window adds unless it ends inside a UTF-8 sequence; return chars added."""
        prefix_text = self._decode(self._window_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._window_ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return 0
        self.text += new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._window_ids)
        return len(new_text) - len(prefix_text)

    def _flush(self) -> int:
        """Commit whatever the window still holds back (an incomplete character becomes U+FFFD)."""
        if self._read_offset == len(self._window_ids):
            return 0
        prefix_text = self._decode(self._window_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._window_ids[self._prefix_offset:])
        added = new_text[len(prefix_text):]
        self.text += added
        self._prefix_offset = self._read_offset = len(self._window_ids)
        return len(added)

    def _find_stop(self, new_chars: int) -> bool:
        """Cut the text at the earliest stop string that the last `new_chars` characters complete."""
        if not self._max_stop_len:
            return False
        start = max(0, len(self.text) - new_chars - self._max_stop_len + 1)
        found = [(index, stop) for stop in self._params.stop if (index := self.text.find(stop, start)) >= 0]
        if not found:
            return False
        index, stop = min(found)
        self.text = self.text[:index]
        self._finish("stop", stop)
        return True

    def _finish(self, reason: str, stop_reason: int | str | None) -> str:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        return reason
