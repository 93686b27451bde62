"""The engine's one hand-written extension (``csrc/decode_attention.cpp``, ``linear_rows.cpp``, ``rotary.cpp``),
built once per environment by torch's JIT extension loader: the attention of a whole step in one call per layer, and
what else no library does fast enough on a CPU.

- ``decode_attention``: CPU decode attention over the paged, token-major device-tier cache, each sequence's
  KV a list of slot runs (its block table), with sliding window and soft-cap; float32, bfloat16 or float16
  cache, float32 arithmetic. No installed library reads such a cache in place on CPU: DeepSpeed's inference
  kernels are CUDA-only, torch's SDPA wants one call per sequence and reads the cache head by head at under
  half of memory speed here, and FlexAttention on CPU needs a torch.compile of each new shape (measured:
  seconds per shape, and a decode batch changes shape every step).
- ``paged_decode_attention``: the engine's decode entry, one call per layer: the new token's K/V written into
  the cache, each sequence's block table (a row of the step's persistent buffer) merged into runs of adjacent
  blocks, then ``decode_attention``'s loops; the query in its own dtype, so that nothing else runs around it.
- ``prefill_attention``: the packed ragged prefill row, one call per layer, prompts over a cached prefix
  included; inside, per prompt, causal attention as float32 GEMMs over blocks of query rows
  (:data:`PREFILL_BLOCK_ROWS`; ATen's fused SDPA took 1.6x the time here on SmolLM2 in bf16, and rounds the
  weights to bf16); in the AVX512_BF16 build a bf16 prompt's scores are VDPBF16PS sums of exact products
  (float32 lanes, tiles of 32 keys by 8 rows, head sizes of whole 32-element pairs) and its softmax one pass a
  row over the keys the row sees, at twice the float32 GEMM's rate; SDPA where a window binds, the eager formula where a soft-cap is set (ATen throughout, so
  it also runs on CUDA tensors).
- ``rms_norm``: transformers' Llama RMS norm (float32 mean square, scaled row rounded to the input's dtype, times
  the weight) in one pass a row instead of seven ATen operators over the whole tensor: on SmolLM2's 576
  features in bf16 with 2 threads, 18.3 us a one-row call eager, 3.9 ms at 4,096 rows (the norms are 61 calls a
  step).
- ``silu_mul``: the gated MLP's ``silu(gate) * up`` in one pass instead of two operators (the intermediate
  written and read again; ATen's SiLU spends ~0.6 ns an element on its exponential here).
- ``rotary``: transformers' Llama ``apply_rotary_pos_emb`` for a layer's query and key in one call instead of
  twelve ATen operators, the same bits (each product and the sum rounded as the operators round).
- ``argmax``: a greedy step's tokens from its bf16 logits in one pass (no float32 copy of [N, vocab] first).
- ``linear_rows``: a bf16 linear over one or two input rows (decode at batch 1-2), each weight row read front to
  back (a module's q/k/v or gate/up in one call): oneDNN's prepacked GEMM reads the weights from memory at
  11-17 GB/s here, this loop at 17-28 GB/s (SmolLM2's layers: 12.3 -> 7.5 ms a step's linears on two threads).

One build per instruction set, chosen from ``/proc/cpuinfo``'s flags (:func:`isa`) and named after it, so that
nodes with different CPUs sharing an environment do not load each other's build:

- ``seesaw_decode_attention_avx512bf16``: the AVX-512 build below, with ``-mavx512bf16`` for
  :func:`linear_rows`'s VDPBF16PS loop and the bf16 prefill's scores (the CPUs with AVX512_BF16: Zen 4, Sapphire
  Rapids and later; both CI machines). Only this build's loop is handed to the stage (:func:`few_row_linear`).
- ``seesaw_decode_attention_avx512`` (avx512f/bw/vl/dq with avx2/fma/f16c): 16-lane loops for head sizes that
  are multiples of 16; its AVX2 loops for other multiples of 8, plain loops for the rest. Decode attention is
  a quarter or more of a bf16 SmolLM2 step; on the EPYC (Zen 4) guest it runs in 0.44x the time of the AVX2
  loops this replaced (``launch/bench_attention.py``; 0.27x with fragmented block tables), most of that from
  computing the query heads that share a KV head together (GQA: each key and value row read and widened once
  for all of them) and from prefetching a sequence's KV into L2 across its runs, the rest (0.87x) from the
  wider vectors.
- ``seesaw_decode_attention_avx2`` (avx2, fma, f16c): the same loops over 8 lanes (head sizes multiples of 8).
- ``seesaw_decode_attention_base``: plain loops only (any x86-64 or other CPU).

Every path computes in float32 (the engine's agreement with a float32 reference is a tracked target): the
bf16 dot-product instruction, which needs the query in bfloat16, measured slower even with the query split in
two bfloat16 halves. The build has OpenMP (``-fopenmp``) so that the kernel's ``at::parallel_for`` spreads the
sequences over torch's intra-op threads (one per rank by default).

The extension is optional: where it cannot be built (no compiler), attention falls back to one SDPA call per
sequence with the same results up to float rounding, after one warning.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from seesaw_ds import cpu_features
from seesaw_ds.distributed.env import export_extension_dir

log = logging.getLogger("seesaw_ds")

_SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("decode_attention.cpp", "linear_rows.cpp",
                                                                        "rotary.cpp")]
_module = None
_failed: str | None = None


def _cpu_flags() -> set[str]:
    return cpu_features.cpu_flags() or set()


#: the compiler flags of each build: AVX-512 also compiles the AVX2 loops (its fallback for head sizes that are
#: multiples of 8 but not of 16)
ISA_FLAGS = {
    "avx512bf16": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "base": [],
}


def isa(cpu_flags: set[str] | None = None) -> str:
    """The widest build the CPU (``/proc/cpuinfo``'s flags by default) runs: ``avx512bf16`` (AVX-512 with the
    bf16 dot product, for :func:`linear_rows`), ``avx512``, ``avx2`` or ``base``."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if not {"avx2", "fma", "f16c"} <= flags:
        return "base"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    return "avx512bf16" if "avx512_bf16" in flags else "avx512"


def compile_flags(name: str) -> list[str]:
    """The compiler flags of build ``name`` (:data:`ISA_FLAGS`); ``-fopenmp`` (also at link time) makes
    ``at::parallel_for`` spread the sequences over torch's intra-op threads (without it the header-only
    parallel_for runs serially)."""
    return ["-O3", "-fopenmp"] + ISA_FLAGS[name]


def load():
    """The compiled module, building it on first use (a file lock lets one rank build while the others
    wait; a lock left by a killed build is removed with a warning, seesaw_ds/distributed/jit_lock.py);
    None, with one warning, where it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    from torch.utils.cpp_extension import load as jit_load

    name = isa()  # one build per instruction set: nodes may differ
    export_extension_dir()
    try:
        _module = jit_load(f"seesaw_decode_attention_{name}", [str(path) for path in _SOURCES],
                           extra_cflags=compile_flags(name),
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers: SDPA still works
        _failed = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        log.warning("seesaw_ds decode-attention kernel unavailable (%s); using torch SDPA", _failed)
    return _module


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: "SpanRuns",
                     scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """``query`` [N, Hq, D] against each sequence's KV runs in one layer's flat cache ``keys``/``values``
    [slots, Hkv, D] (``runs``: :class:`SpanRuns`); only the last ``window`` tokens when set, scores
    soft-capped when ``softcap`` is set. Returns [N, Hq, D] in the query's dtype (float32 inside). Call only
    when :func:`applies`."""
    out = _module.decode_attention(query.float().contiguous(), keys, values, runs.offsets, runs.first, runs.count,
                                   float(scale), int(window or 0), float(softcap or 0.0))
    return out.to(query.dtype)


def paged_decode_attention(query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, keys: torch.Tensor,
                           values: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
                           write_slots: torch.Tensor, block_size: int, scale: float, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """One layer of a decode step in one call: ``new_keys``/``new_values`` [N, Hkv, D] written into the flat
    cache ``keys``/``values`` [slots, Hkv, D] at ``write_slots``, then ``query`` [N, Hq, D] against each
    sequence's first ``lengths[n]`` tokens in blocks ``block_table[n]`` (int64; rows and vectors may be longer
    than N). Returns [N, Hq, D] in the query's dtype (float32 inside). Call only when :func:`applies`."""
    return _module.paged_decode_attention(query, new_keys, new_values, keys, values, block_table, lengths,
                                          write_slots, int(block_size), float(scale), int(window or 0),
                                          float(softcap or 0.0))


PREFILL_BLOCK_ROWS = 32
"""Query rows per float32 GEMM of the prefill's causal attention without window or soft-cap (0: ATen's SDPA per
prompt instead). 32 measured 13-17% less CPU a prefill step than SDPA on the AMD EPYC (docs/benchmarks.md,
"Issue 22 item 4"). Judged against float32 (``launch/prefill_agreement.py``): its bf16 output equals exact
attention rounded once to bf16 (SDPA's error is larger), and whole bf16 runs' logits are as close to the float32
model's as transformers' bf16 (RMS 0.159 against 0.159 on SmolLM2, 0.153 against 0.155 on the GPU check's
tiny model); greedy tokens differ from float32 only at near-ties, as transformers' bf16 do."""


def prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float, window: int | None = None, softcap: float | None = None,
                      contexts: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> torch.Tensor:
    """Causal attention within each prompt of a packed row: ``query`` [Hq, T, D], ``keys``/``values``
    [Hkv, T, D], prompt i at ``cu_seqlens[i]:cu_seqlens[i+1]`` (int64, CPU). ``contexts[i]``, when given and not
    None, is a cached prefix's ``(keys, values)`` [Hkv, P, D] that prompt i's rows (its positions P on) also
    attend. Returns [Hq, T, D]. Call only when :func:`built`."""
    context_keys, context_values = [], []
    if contexts is not None:
        none = keys.new_empty((keys.shape[0], 0, keys.shape[2]))
        context_keys = [c[0] if c is not None else none for c in contexts]
        context_values = [c[1] if c is not None else none for c in contexts]
    return _module.prefill_attention(query, keys, values, cu_seqlens, float(scale), int(window or 0),
                                     float(softcap or 0.0), context_keys, context_values, PREFILL_BLOCK_ROWS)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMS norm of ``hidden`` [..., n] with ``weight`` [n] (one dtype, CPU) in one pass a row.
    Call only when :func:`built`."""
    return _module.rms_norm(hidden, weight, float(eps))


def silu_mul_applies(gate: torch.Tensor) -> bool:
    """Whether :func:`silu_mul` is the faster way for ``gate`` here: bf16 on a CPU with an AVX-512 build (its
    lanes run the whole pass; float32, float16 and other builds take a scalar loop, slower than ATen's)."""
    return gate.dtype == torch.bfloat16 and gate.device.type == "cpu" and load() is not None \
        and _module.__name__.startswith("seesaw_decode_attention_avx512")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (one dtype and shape, CPU, rows contiguous) in one pass, each step rounded as ATen's two
    operators round; the sigmoid's exponential within a few float32 ulps of ATen's. Call only when :func:`built`."""
    return _module.silu_mul(gate, up)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its largest value (int64 [N]), as ``logits.float().argmax(1)`` gives it: on a CPU
    in bf16 one pass of the extension over the bf16 rows (ATen's bf16 argmax is a scalar loop, 3x its float32
    one), else ATen's."""
    if logits.device.type == "cpu" and logits.dtype == torch.bfloat16 and logits.dim() == 2 and logits.shape[1] \
            and logits.stride(1) == 1 and built():
        return _module.argmax_rows(logits)
    return logits.float().argmax(dim=1) if logits.device.type == "cpu" else logits.argmax(dim=1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama ``apply_rotary_pos_emb(q, k, cos, sin)``: ``q`` [B, Hq, S, D], ``k`` [B, Hk, S, D],
    ``cos``/``sin`` [B, S, D], all of one dtype on the CPU; returns ``(q_embed, k_embed)``, ATen's bits. Call only
    when :func:`built`."""
    return _module.rotary(q, k, cos, sin)


LINEAR_ROWS = 2
"""Input rows up to which a bf16 CPU linear streams its weight through :func:`linear_rows` rather than oneDNN's
prepacked GEMM: one or two rows measured 1.6x faster on the AMD EPYC with AVX512_BF16 (csrc/linear_rows.cpp);
at four they were even."""

LINEAR_ROWS_AVX2 = 1
"""The same for the ``avx2`` build's portable loop, against the float32 copies an AVX2-only CPU's bf16 linears run
on (backends.deepspeed.widens_bf16): 30 layers' gate_proj at one row 6.97 against MKL's 11.0 ms on one thread,
4.28 against 11.7 on two; at two rows 21.0 against 16.6 on one thread (AMD EPYC without AVX-512)."""


def linear_rows(x: torch.Tensor, weights: list[torch.Tensor], portable: bool = False) -> torch.Tensor:
    """``x`` [..., K] (bf16, at most four rows) against each of ``weights`` [N_i, K] (bf16, rows contiguous,
    possibly strided: a shard's view), outputs side by side: [..., sum N_i], float32 sums rounded once to bf16.
    The ``avx512bf16`` build's loop uses the bf16 dot product unless ``portable``. Call only when :func:`built`."""
    return _module.linear_rows(x, weights, portable)


def few_row_linear():
    """``(linear, most rows)`` where streaming the weights measured faster than the GEMM at a few rows (the
    ``avx512bf16`` build: :data:`LINEAR_ROWS`; the ``avx2`` build: :data:`LINEAR_ROWS_AVX2`), else None: what
    the backend's prepacked linears are given
    (:func:`seesaw_ds.backends.deepspeed.pack_cpu_linears`' ``few_rows``). ``linear(x, weights)`` is the extension's own
    call: nothing in Python around it (a step makes ~120 such calls)."""
    if load() is None:
        return None
    if _module.linear_rows_loop() == "avx512_bf16":
        return _module.linear_rows, LINEAR_ROWS
    return (_module.linear_rows, LINEAR_ROWS_AVX2) if isa() == "avx2" else None


class SpanRuns:
    """Each sequence's KV as runs of consecutive cache slots, flattened for the kernel: sequence n owns runs
    ``offsets[n]:offsets[n+1]`` of (``first``, ``count``). Built once per step, used by every layer."""

    __slots__ = ("offsets", "first", "count")

    def __init__(self, spans: list[list[tuple[int, int]]]):
        flat = [run for runs in spans for run in runs]
        bounds = [0]
        for runs in spans:
            bounds.append(bounds[-1] + len(runs))
        self.offsets = torch.tensor(bounds, dtype=torch.long)
        pairs = torch.tensor(flat, dtype=torch.long).reshape(-1, 2)
        self.first = pairs[:, 0].contiguous()
        self.count = pairs[:, 1].contiguous()


def state() -> str:
    """The extension's state in words, building nothing: which build is loaded, why it failed, or that nothing
    asked for it yet (what a CUDA-only run should say)."""
    if _module is not None:
        return f"loaded ({_module.__name__})"
    return f"unavailable ({_failed})" if _failed is not None else "not loaded"


def built() -> bool:
    """Whether the extension is available (built here, or loadable)."""
    return load() is not None


def applies(keys: torch.Tensor) -> bool:
    """Whether the decode kernel can run on this cache (CPU, float32/bfloat16/float16, contiguous, built)."""
    return keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and keys.is_contiguous() and load() is not None
