"""Tiny, deterministic random checkpoints of the model families users run, for token-exact tests (a test
fixture: it lives under tests/, importable as ``tiny_families`` since pytest puts tests/ on the path).

``seesaw_ds.model.tiny`` builds the project's own Llama / Mistral / Qwen2; this module builds one small
checkpoint per *family feature set* the engine must reproduce token for token against plain transformers:
Llama 2 / 3.x, Mistral, Mixtral, Qwen2 / 2.5, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text),
Phi-3 / 3.5 / 4, OLMo 2 and Granite (``CASES``), plus checkpoints the engine must refuse
(``make_unsupported_checkpoint``).

Every case: hidden 64, 4 query heads, 2 KV heads unless stated (so tp=2 splits heads), vocabulary = the
1024 tokens of ``tiny.build_tokenizer()`` (its special ids: unk 0, bos 1, eos 2, pad 3),
``max_position_embeddings`` 512, 3 or 5 layers (5 splits unevenly under pp=2). Each case turns on the
family's own features (see ``CASES``' ``about``); MoE cases have 4 experts, top-2.

**Expert weight layouts.** transformers 5 holds MoE experts fused, as 3-D parameters
``mlp.experts.gate_up_proj`` ``[E, 2*I, H]`` (rows ``:I`` are gate, ``I:`` up) and
``mlp.experts.down_proj`` ``[E, H, I]``. Note that plain ``save_pretrained`` *reverts* that on save
(``save_original_format=True``, transformers/core_model_loading.py ``revert_weight_conversion``) and writes
the legacy per-expert names, as Hub checkpoints have them; the fused cases here are saved with
``save_original_format=False`` so that their files really hold the fused keys. The ``*_per_expert`` cases
hold the same weights as their base case under the legacy names that transformers' checkpoint conversion
mapping (transformers/conversion_mapping.py, ``"mixtral"`` and ``"qwen2_moe"``; ``qwen3_moe`` uses the
latter) merges on load (``LEGACY_EXPERT_KEYS``):

- Mixtral: ``model.layers.L.block_sparse_moe.gate.weight`` (router) and
  ``model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (gate ``[I, H]``, up ``[I, H]``, down
  ``[H, I]``); the whole ``.mlp.`` infix is ``.block_sparse_moe.`` there.
- Qwen2-MoE / Qwen3-MoE: ``model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight``; the router
  (``mlp.gate.weight``), ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight`` keep their names.

**Decisive logits** (as in ``tiny``; see its docstring): one seeded generator fills every parameter in name
order; the output matrix is scaled so that logits have a standard deviation of ``tiny.LOGIT_STD`` (before
Granite's ``logits_scaling`` division, which the scale undoes, and before Gemma's final soft-capping);
what each attention / MLP block adds to the residual stream has ``tiny.RESIDUAL_GAIN`` times the RMS of
the token embedding *as it enters the residual stream* (Gemma multiplies embeddings by sqrt(hidden),
Granite by ``embedding_multiplier``; Granite's ``residual_multiplier`` is undone in the projection scale,
and in the post-norm families (Gemma 2/3, OLMo 2) the output norms' weights set that RMS). The final norm's
weights are random signs (Gemma: ``1 + w`` is, i.e. ``w`` in {0, -2}); the other norms' (q/k norms
included) are drawn from [0.5, 1.5] (Gemma: ``w`` from [-0.5, 0.5]) so that an engine which drops or
mis-slices a norm weight is caught. Routers (``mlp.gate.weight``) give logits with standard deviation
``ROUTER_STD`` so that the top-2 choice is rarely close; ``shared_expert_gate`` gives sigmoid inputs of
standard deviation 1; biases are N(0, 0.1^2). Untied models never produce special tokens other than eos.
``check_greedy`` measures the result (``python tests/tiny_families.py`` prints it per case).

**LongRoPE** (``phi3_longrope``): transformers picks the factor set by sequence length: a forward whose
largest position id + 1 exceeds ``original_max_position_embeddings`` uses ``long_factor`` for all its
positions, otherwise ``short_factor``; and Phi-3's ``prepare_inputs_for_generation`` drops the KV cache
and re-runs the whole sequence once, when it first reaches ``original_max_position_embeddings + 1``
tokens. So for one sequence (batch of one) the reference is: the logits that predict token n+1 from n
tokens use short factors on every position while n <= ``LONGROPE_ORIGINAL_MAX`` (24) and long factors on
every position (the cached keys recomputed) once n > 24. With prompts of 2-17 tokens and 16 new tokens,
prompts of 10 tokens or more cross the switch during decoding, and prompts longer than 24 start on the long
factors; keys left as cached before the switch change the greedy tokens of crossing prompts here (only
Phi-3, PhiMoE and Phi-4-multimodal recompute in transformers). (In a left-padded batch transformers decides by the padded length, i.e. for the whole batch at
once: compare against batch-of-one references.) The attention factor ``sqrt(1 + ln(512/24) / ln 24)``
scales cos/sin in both regimes. The case also has Phi-4-mini's ``partial_rotary_factor`` 0.75 (12 of 16
dimensions rotate) and tied embeddings.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from seesaw_ds.model import tiny

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

MANIFEST_NAME = "seesaw_family.json"
"""File in each checkpoint built here recording the case, seed and dtype."""

ROUTER_STD = 3.0
"""Standard deviation of the router logits of a freshly built MoE model."""

LONGROPE_ORIGINAL_MAX = 24
"""``original_max_position_embeddings`` of ``phi3_longrope``: sequences longer than this use ``long_factor``."""

_HIDDEN = 64
_HEAD_DIM = 16
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# rotary dims = 16 * 0.75 = 12 -> 6 factors each; short near 1, long growing with the dimension
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
             "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.35],
             "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
# (Phi-3.5 / Phi-4-mini configs state original_max_position_embeddings at the top level; transformers copies it in
# and warns once that it prefers a "factor" there.)
_GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}


def _case(model_type: str, about: str, **config) -> dict:
    return {"model_type": model_type, "about": about, "config": config}


CASES: dict[str, dict] = {
    "llama3": _case(
        "llama", "Llama 3.x: GQA 4/2, llama3 rope scaling (factor 8, low/high freq 1/4, original 64 positions: "
        "head_dim 16 at theta 5e5 has frequencies in all three bands), untied, 5 layers",
        num_hidden_layers=5, intermediate_size=128, head_dim=_HEAD_DIM, tie_word_embeddings=False,
        rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5),
    "llama2": _case(
        "llama", "Llama 2: MHA (4 KV heads), default rope theta 1e4, untied, 3 layers",
        num_hidden_layers=3, intermediate_size=128, num_key_value_heads=4, head_dim=_HEAD_DIM,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama_dynamic": _case(
        "llama", "Llama with dynamic NTK rope (factor 2) and 20 positions, so sequences grow past them: "
        "the frequencies follow each sequence's own length (computed per sequence, never per batch)",
        num_hidden_layers=3, intermediate_size=128, head_dim=_HEAD_DIM, tie_word_embeddings=False,
        max_position_embeddings=20, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral": _case(
        "mistral", "Mistral: sliding window 8 on every layer, GQA, untied, 5 layers",
        num_hidden_layers=5, intermediate_size=128, head_dim=_HEAD_DIM, sliding_window=8,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mixtral": _case(
        "mixtral", "Mixtral: 4 experts top-2 (renormalised), expert intermediate 96, fused expert keys "
        "(mlp.experts.gate_up_proj / down_proj, 3-D) in the file, untied, 3 layers",
        num_hidden_layers=3, intermediate_size=96, head_dim=_HEAD_DIM, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2": _case(
        "qwen2", "Qwen2/2.5: q/k/v biases, tied embeddings, theta 1e6, 5 layers",
        num_hidden_layers=5, intermediate_size=128, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2_moe": _case(
        "qwen2_moe", "Qwen2-MoE: 4 experts top-2 (not renormalised), expert intermediate 32, shared expert "
        "(intermediate 64) with sigmoid shared_expert_gate, q/k/v biases, layer 2 dense (mlp_only_layers, "
        "intermediate 96), fused expert keys, untied, 5 layers",
        num_hidden_layers=5, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[2],
        tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": _case(
        "qwen3", "Qwen3: per-head q/k RMSNorm, head_dim 32 != hidden/heads (q_proj 64->128), tied, 5 layers",
        num_hidden_layers=5, intermediate_size=96, head_dim=32, tie_word_embeddings=True,
        attention_bias=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3_moe": _case(
        "qwen3_moe", "Qwen3-MoE: 4 experts top-2 renormalised (norm_topk_prob), expert intermediate 48, q/k "
        "norm, head_dim 32, every layer sparse, fused expert keys, untied, 3 layers",
        num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=48, head_dim=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma2": _case(
        "gemma2", "Gemma 2: attention soft-capping 2.0 (small enough to bend these scores) and final logit "
        "soft-capping 30, sliding window 8 on even layers, head_dim 32, query_pre_attn_scalar 16 "
        "(scale 1/4, not 1/sqrt(32)), sandwich norms, (1+w) RMSNorm, sqrt(hidden) embedding scale, GeGLU, "
        "tied, 5 layers",
        num_hidden_layers=5, intermediate_size=128, head_dim=32, query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0, final_logit_softcapping=30.0, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gemma3": _case(
        "gemma3_text", "Gemma 3 text (Gemma3ForCausalLM): layer_types s,f,s,s,f with sliding window 8, "
        "per-layer-type rope (sliding: default theta 1e4; full: linear factor 8, theta 1e6), per-head q/k "
        "norm, head_dim 32, query_pre_attn_scalar 24, sandwich norms, (1+w) RMSNorm, tied, 5 layers",
        num_hidden_layers=5, intermediate_size=128, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"],
        tie_word_embeddings=True, rope_parameters=_GEMMA3_ROPE),
    "phi3": _case(
        "phi3", "Phi-3: fused qkv_proj [(4+2+2)*16, 64] and gate_up_proj [2*96, 64], default rope, untied, "
        "3 layers",
        num_hidden_layers=3, intermediate_size=96, original_max_position_embeddings=512,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phi3_longrope": _case(
        "phi3", f"Phi-3.5/Phi-4-mini: longrope (short/long factors, original_max_position_embeddings "
        f"{LONGROPE_ORIGINAL_MAX}; see the module docstring), partial_rotary_factor 0.75, fused qkv/gate_up, "
        "tied, 3 layers",
        num_hidden_layers=3, intermediate_size=96, original_max_position_embeddings=LONGROPE_ORIGINAL_MAX,
        tie_word_embeddings=True, rope_parameters=_LONGROPE),
    "olmo2": _case(
        "olmo2", "OLMo 2: q/k RMSNorm over all heads at once (q_norm [64], k_norm [32]: TP needs the global "
        "sum of squares), no pre-norms, post-attention / post-feedforward norms, theta 5e5, untied, 5 layers",
        num_hidden_layers=5, intermediate_size=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "granite": _case(
        "granite", "Granite 3: embedding_multiplier 6, residual_multiplier 0.25, attention_multiplier 0.125 "
        "(not 1/sqrt(16)), logits_scaling 4, tied, 3 layers",
        num_hidden_layers=3, intermediate_size=128, embedding_multiplier=6.0, residual_multiplier=0.25,
        attention_multiplier=0.125, logits_scaling=4.0, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
for _base in ("mixtral", "qwen2_moe", "qwen3_moe"):
    CASES[f"{_base}_per_expert"] = {
        **CASES[_base], "about": f"the same weights as {_base}, under the legacy per-expert key names",
        "per_expert_of": _base,
    }
del _base

LEGACY_EXPERT_KEYS = MappingProxyType({
    "mixtral": MappingProxyType({"module": "block_sparse_moe", "gate": "w1", "up": "w3", "down": "w2"}),
    "qwen2_moe": MappingProxyType({"module": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "qwen3_moe": MappingProxyType({"module": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
})
"""Per model type: the MLP module's name and the per-expert projection names of the legacy checkpoints."""

UNSUPPORTED_KINDS = ("gpt2", "gemma3_multimodal", "rope_unhandled")
"""Kinds ``make_unsupported_checkpoint`` builds."""

# Norms whose weights set the RMS of what a block adds to the residual stream (post-norm families).
_OUTPUT_NORMS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}
_UNIT_OFFSET_NORMS = ("gemma2", "gemma3_text")  # RMSNorm multiplies by (1 + weight)


@functools.lru_cache(maxsize=1)
def _tokenizer() -> PreTrainedTokenizerFast:
    return tiny.build_tokenizer()


def _token_ids() -> dict[str, int]:
    tok = _tokenizer()
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def make_config(case: str, *, dtype: torch.dtype = torch.float32):
    """The transformers config of ``case`` (a ``CASES`` key)."""
    from transformers import CONFIG_MAPPING

    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; expected one of {sorted(CASES)}")
    spec = CASES[case]
    kwargs = {"vocab_size": len(_tokenizer()), "hidden_size": _HIDDEN, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, **_token_ids(),
              **copy.deepcopy(spec["config"]), "dtype": dtype}
    kwargs.setdefault("rms_norm_eps", 1e-6)
    return CONFIG_MAPPING[spec["model_type"]](**kwargs)


def _embedding_multiplier(config) -> float:
    """Factor between an embedding row and what enters the residual stream."""
    if config.model_type in _UNIT_OFFSET_NORMS:
        return math.sqrt(config.hidden_size)
    return float(getattr(config, "embedding_multiplier", 1.0))


def init_parameters(model: torch.nn.Module, *, seed: int, num_real_tokens: int,
                    silent_token_ids: Sequence[int]) -> None:
    """Overwrite every parameter of a freshly built model from one seeded generator, in name order."""
    config = model.config
    model_type = config.model_type
    hidden = config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    offset = 1.0 if model_type in _UNIT_OFFSET_NORMS else 0.0  # Gemma's norm scale is 1 + weight
    # logits = normed hidden (RMS 1) . output rows [/ logits_scaling]
    out_std = tiny.LOGIT_STD / math.sqrt(hidden) * float(getattr(config, "logits_scaling", 1.0))
    embed_rms = out_std * _embedding_multiplier(config)  # the embedding's RMS in the residual stream
    block_rms = tiny.RESIDUAL_GAIN * embed_rms / float(getattr(config, "residual_multiplier", 1.0))
    output_norms = _OUTPUT_NORMS.get(model_type, ())

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        for name, param in sorted(model.named_parameters(remove_duplicate=True), key=lambda item: item[0]):
            leaf = name.rsplit(".", 1)[-1]
            if name == "model.norm.weight":
                # random signs (see tiny): no affinity of a tied model for its own input token
                values = torch.randint(0, 2, param.shape, generator=gen).float() * 2.0 - 1.0 - offset
            elif any(f".{norm}." in name for norm in output_norms):
                values = block_rms * uniform(param.shape, 0.5, 1.5) - offset
            elif "norm" in name:
                values = uniform(param.shape, 0.5, 1.5) - offset
            elif leaf == "bias":
                values = torch.randn(param.shape, generator=gen) * 0.1
            elif "embed_tokens" in name or "lm_head" in name:
                values = torch.randn(param.shape, generator=gen) * out_std
                values[num_real_tokens:] = 0.0  # zero rows: logit 0, never the greedy choice
                if name == "lm_head.weight":  # untied only
                    values[list(silent_token_ids)] = 0.0
            elif re.search(r"\.mlp\.gate\.weight$", name):  # MoE router
                values = torch.randn(param.shape, generator=gen) * (ROUTER_STD / math.sqrt(param.shape[-1]))
            elif re.search(r"(o_proj|down_proj)(\.weight)?$", name) and not output_norms:
                fan_in = param.shape[-1]
                values = torch.randn(param.shape, generator=gen) * (block_rms / math.sqrt(fan_in))
            elif param.dim() >= 2:  # 2-D linears and 3-D expert stacks [E, out, in]
                values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
            else:
                raise ValueError(f"no init rule for parameter {name} of shape {tuple(param.shape)}")
            param.copy_(values.to(param.dtype))


def build_family_model(case: str, *, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build ``case``'s model (eval mode, ``dtype``) and the tokenizer in memory."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(case, dtype=dtype)
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):  # transformers' init draws from the global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    silent = [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS if t != tiny.EOS_TOKEN]
    init_parameters(model, seed=seed, num_real_tokens=len(tokenizer), silent_token_ids=silent)
    model = model.to(dtype).eval()
    ids = _token_ids()
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                                               pad_token_id=ids["pad_token_id"])
    return model, tokenizer


def to_per_expert_state_dict(state_dict: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Rewrite fused expert parameters (``mlp.experts.gate_up_proj`` / ``down_proj``) into the legacy
    per-expert keys of ``model_type`` (``LEGACY_EXPERT_KEYS``); every other key is kept (renamed into
    ``block_sparse_moe`` for Mixtral)."""
    names = LEGACY_EXPERT_KEYS[model_type]
    module = names["module"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(.+)", key)
        if match is None:
            out[key] = tensor
            continue
        prefix, rest = f"{match.group(1)}.{module}", match.group(2)
        if rest == "experts.gate_up_proj":
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.experts.{e}.{names['gate']}.weight"] = tensor[e, :inter].clone()
                out[f"{prefix}.experts.{e}.{names['up']}.weight"] = tensor[e, inter:].clone()
        elif rest == "experts.down_proj":
            for e in range(tensor.shape[0]):
                out[f"{prefix}.experts.{e}.{names['down']}.weight"] = tensor[e].clone()
        else:
            out[f"{prefix}.{rest}"] = tensor
    return out


def _finish_dir(out: Path, manifest: dict) -> None:
    manifest_path = out / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    mode = manifest_path.stat().st_mode & 0o777  # safetensors writes 0600: use the umask's mode (see tiny)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(mode)


def make_family_checkpoint(case: str, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                           seed: int = 0) -> Path:
    """Write ``case``'s complete checkpoint (config.json, model.safetensors, generation_config.json, the
    tokenizer files, ``seesaw_family.json``) to ``out_dir``; deterministic in its arguments. Returns the dir."""
    spec = CASES.get(case)
    if spec is None:
        raise ValueError(f"unknown case {case!r}; expected one of {sorted(CASES)}")
    model, tokenizer = build_family_model(case, dtype=dtype, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "per_expert_of" in spec:
        state = to_per_expert_state_dict(dict(model.state_dict()), model.config.model_type)
        model.save_pretrained(out, state_dict=state, save_original_format=False)
    else:
        # False: keep transformers 5's own (fused expert) names in the file; a no-op for dense models
        model.save_pretrained(out, save_original_format=False)
    tokenizer.save_pretrained(out)
    _finish_dir(out, {"case": case, "model_type": spec["model_type"], "seed": seed,
                      "dtype": str(dtype).removeprefix("torch."), "logit_std": tiny.LOGIT_STD,
                      "residual_gain": tiny.RESIDUAL_GAIN, "router_std": ROUTER_STD,
                      "num_parameters": sum(p.numel() for p in model.parameters())})
    return out


def _unsupported_model(kind: str):
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM, SiglipVisionConfig)

    ids = _token_ids()
    vocab = len(_tokenizer())
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
        return GPT2LMHeadModel(config)
    if kind == "gemma3_multimodal":
        text = make_config("gemma3").to_dict()
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=28, patch_size=14)
        # 28/14 = 2 patches a side, pooled to 1 token per image
        config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=1,
                              boi_token_index=4, eoi_token_index=5, image_token_index=6,
                              **{k: v for k, v in ids.items() if k != "bos_token_id"})
        return Gemma3ForConditionalGeneration(config)
    if kind == "rope_unhandled":
        # "proportional" (Gemma-4 style partial rope) is a rope_type transformers 5.24 runs but the engine
        # does not implement
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=_HEAD_DIM,
                             max_position_embeddings=512, **ids,
                             rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown unsupported kind {kind!r}; expected one of {UNSUPPORTED_KINDS}")


def make_unsupported_checkpoint(kind: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a small checkpoint the engine must refuse (``UNSUPPORTED_KINDS``): ``gpt2`` (GPT2LMHeadModel),
    ``gemma3_multimodal`` (Gemma3ForConditionalGeneration, model_type ``gemma3``, a one-layer SigLIP vision
    tower), ``rope_unhandled`` (a Llama with rope_type ``proportional``). Files as ``make_family_checkpoint``
    (transformers loads every one of them); the weights are plain small random values."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _unsupported_model(kind).eval()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    _finish_dir(out, {"unsupported": kind, "seed": seed})
    return out


def gap_prompts(num: int = 5, *, seed: int = 1234) -> list[list[int]]:
    """``num`` deterministic random prompts (token ids: bos, then ordinary tokens) of lengths 2..17."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = len(tiny.SPECIAL_TOKENS)
    lengths = [2 + round(i * 15 / max(num - 1, 1)) for i in range(num)]
    bos = _token_ids()["bos_token_id"]
    return [[bos] + torch.randint(first, len(_tokenizer()), (n - 1,), generator=gen).tolist() for n in lengths]


def check_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16) -> dict:
    """Greedy-generate from each prompt alone (batch of one); return the minimum top-2 logit gap over every
    step, the minimum router margin (2nd minus 3rd router logit over every token and MoE layer; None for
    dense models) and the generated ids per prompt."""
    router_margin = [math.inf]
    hooks = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if name.endswith(".mlp") and gate is not None and hasattr(module, "experts"):
            def hook(mod, args, gate=gate):
                logits = torch.nn.functional.linear(args[0].float(), gate.weight.float())
                top = torch.topk(logits, 3, dim=-1).values
                router_margin[0] = min(router_margin[0], float((top[..., 1] - top[..., 2]).min()))
            hooks.append(module.register_forward_pre_hook(hook))
    eos_id = model.generation_config.eos_token_id
    min_gap = math.inf
    outputs = []
    try:
        for prompt in prompts:
            input_ids = torch.tensor([list(prompt)])
            with torch.no_grad():
                result = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
            ids = []
            for step, logits in enumerate(result.logits):
                top2 = torch.topk(logits[0].float(), 2).values
                min_gap = min(min_gap, float(top2[0] - top2[1]))
                ids.append(int(result.sequences[0, input_ids.shape[1] + step]))
                if ids[-1] == eos_id:
                    break
            outputs.append(ids)
    finally:
        for handle in hooks:
            handle.remove()
    return {"min_gap": min_gap, "router_margin": None if not hooks else router_margin[0], "outputs": outputs}


def main() -> None:
    """Print each case's parameter count, minimum top-2 gap, router margin and greedy outputs."""
    import time

    torch.set_num_threads(1)
    prompts = gap_prompts()
    for case in CASES:
        start = time.perf_counter()
        model, _ = build_family_model(case)
        result = check_greedy(model, prompts)
        n = sum(p.numel() for p in model.parameters())
        print(f"{case:20s} params {n:7d} min_gap {result['min_gap']:.4f} router_margin {result['router_margin']} "
              f"({time.perf_counter() - start:.1f}s)")
        for ids in result["outputs"]:
            print("    ", ids)


if __name__ == "__main__":
    main()
