"""Per-request sampling, one import for its three parts: the parameters (engine/params.py), the seeded
next-token draw (engine/draw.py) and the stop decision with incremental text (engine/stops.py).

Callers may import from here or from the part itself; the parts own the code.
"""
from __future__ import annotations

from seesaw_ds.engine.draw import (apply_token_bitmasks, argmax_suffices, draw_uniform, request_seed,
                                   sample_next_tokens, sample_seed)
from seesaw_ds.engine.params import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_SAMPLES, MODEL_DEFAULT_KEYS, SAMPLING_KEYS,
                                     RequestError, SamplingParams, resolve_sampling)
from seesaw_ds.engine.stops import Detokenizer, StopChecker, eos_token_ids

__all__ = ["MAX_LOGIT_BIAS", "MAX_LOGPROBS", "MAX_SAMPLES", "MODEL_DEFAULT_KEYS", "SAMPLING_KEYS", "Detokenizer",
           "RequestError", "SamplingParams", "StopChecker", "apply_token_bitmasks", "argmax_suffices", "draw_uniform",
           "eos_token_ids", "request_seed", "resolve_sampling", "sample_next_tokens", "sample_seed"]
