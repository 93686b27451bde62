"""A request's sampling parameters: vLLM's names, their defaults and their validation.

`SamplingParams` holds one request's values (validated on construction); `resolve_sampling` layers built-in
defaults < the model's generation config < the job-wide `sampling.*` < the request's own keys. A bad value
is a `RequestError` naming the key, the value and what is allowed. Nothing here knows about tensors,
tokenizers, processes or files.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

class RequestError(ValueError):
    """A request (or a job-wide default) carries a value the engine cannot honour; the message says why."""


def _describe(key: str, value: Any, allowed: str) -> str:
    return f"invalid sampling value {key}={value!r} ({type(value).__name__}): {allowed}"


def is_int(value: Any) -> bool:
    """True for an int that is not a bool (JSON's true/false are no token ids or counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int, allowed: str) -> int:
    if not is_int(value) or value < minimum:
        raise RequestError(_describe(key, value, allowed))
    return value


def _check_int_range(key: str, value: Any, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise RequestError(_describe(key, value, f"must be an integer in [{low}, {high}]"))
    return value


def _check_float(key: str, value: Any, ok, allowed: str) -> float:
    try:
        number = float(value) if is_int(value) or isinstance(value, float) else math.nan
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
    if not isinstance(value, (list, tuple)) or not all(is_int(t) and t >= 0 for t in value):
        raise RequestError(_describe(key, value, "must be a list of token ids (integers >= 0)"))
    return tuple(value)


def _check_top_k(key: str, value: Any) -> int:
    if not is_int(value) or value < -1:
        raise RequestError(_describe(key, value, "must be an integer: -1 or 0 (off) or >= 1"))
    return value


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(_describe(key, value, "must be true or false"))
    return value


def _check_seed(key: str, value: Any) -> int | None:
    if value is not None and not (is_int(value) and -2 ** 63 <= value < 2 ** 63):
        raise RequestError(_describe(key, value, "must be a 64-bit signed integer or null"))
    return value


#: Most top-k logprobs a request may ask for (vLLM's default `max_logprobs`; OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20
#: logit_bias values are clamped to this range by OpenAI; here a value outside it is an error.
MAX_LOGIT_BIAS = 100.0
#: Most samples (`n`) one request may ask for; each is its own sequence in the decode tier.
MAX_SAMPLES = 128


def _check_logprobs(key: str, value: Any) -> int | None:
    if value is not None and not (is_int(value) and 0 <= value <= MAX_LOGPROBS):
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
        if not (is_int(token) and token >= 0):
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
