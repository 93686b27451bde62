"""The model families seesaw_ds serves, as data: one table read by the loader and the stage builder.

seesaw_ds runs transformers' own decoder layers and rebuilds only what sits around them, so a family is
described by what differs between families, not by model code:

- **How every weight shards under TP** comes from transformers itself: each config class carries
  ``base_model_tp_plan`` (``colwise``, ``rowwise``, ``packed_colwise``, ``moe_tp_experts``, ...). A family
  adds only what the plan leaves out (Qwen2-MoE's shared expert) and the *blocks* of fused tensors. Where
  the plan gathers for convenience (``colwise_gather_output`` on Phi-3's fused ``qkv_proj``/``gate_up_proj``
  and on OLMo-2's q/k/v, whose norms span all heads), seesaw_ds shards instead: fused tensors are split per
  block (q by heads, k/v by KV heads, gate/up evenly) and each rank's layers are built from a *local*
  config (its heads and intermediate sizes), so the family's own slicing code sees its shard; OLMo-2's
  q/k norms all-reduce their sum of squares over the TP group.
- **What the model's forward does around the decoder layers**: embedding scale (Gemma, sqrt(hidden) in
  the weights' dtype) or multiplier (Granite), final logit scaling (Granite) or soft-cap (Gemma 2/3), a
  rotary embedding per layer type (Gemma 3).
- **Which config features it handles**: rope types, and the forward-changing settings listed in
  ``FORWARD_FEATURES``. Anything else is refused before a weight is read (:func:`model_spec`).
- **Legacy checkpoint names**: per-expert MoE tensors (older Hub checkpoints) and where they land in
  transformers 5's fused expert tensors.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from seesaw_ds.distributed.layout import LayoutError, ModelDims
from seesaw_ds.model.shards import REPLICATED, ShardKind, Split, TensorRole

PLAN_KINDS = MappingProxyType({
    "colwise": ShardKind.COLUMN,
    "colwise_gather_output": ShardKind.COLUMN,   # sharded per block here, not gathered (module docstring)
    "packed_colwise": ShardKind.COLUMN,
    "rowwise": ShardKind.ROW,
    "rowwise_split_input": ShardKind.ROW,
    "replicated_with_grad_allreduce": ShardKind.REPLICATED,
    # The embedding's vocabulary split across ranks (transformers 5.17 adds it to every tied model's plan):
    # every rank holds the embedding whole here (``ModelSpec.role``), which gives the same output.
    "embedding_rowwise": ShardKind.REPLICATED,
})
"""transformers TP-plan styles and the shard kind seesaw_ds gives them."""

EXPERTS_STYLE = "moe_tp_experts"
"""The plan style of an experts module: experts shard their intermediate dimension, output all-reduced."""

HANDLED_ROPE = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
"""Rope types the rotary embedding serves; transformers computes them, seesaw_ds calls it per sequence
where the frequencies depend on the sequence length (``LENGTH_DEPENDENT_ROPE``)."""

LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rope types whose frequencies transformers picks from the longest position in the call: computed per
sequence, so that a sequence's output never depends on the batch it runs in."""

FORWARD_FEATURES = MappingProxyType({
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "embedding_multiplier": 1.0,
    "logits_scaling": 1.0,
    "residual_multiplier": 1.0,
    "attention_multiplier": None,
    "use_bidirectional_attention": False,
})
"""Config settings that change the forward, with the value that means "off": a config that sets one to
anything else is served only by a family that lists it in ``handles``."""

STANDARD_BLOCKS = MappingProxyType({
    "self_attn.q_proj": (Split.HEADS,),
    "self_attn.k_proj": (Split.KV_HEADS,),
    "self_attn.v_proj": (Split.KV_HEADS,),
})
"""Blocks of the attention projections every family shares (the rest split evenly)."""


class ModelNotSupported(ValueError):
    """A checkpoint seesaw_ds cannot serve exactly; the message names what and lists the families."""


@dataclass(frozen=True)
class LegacyName:
    """A checkpoint name pattern from older checkpoints and the transformers-5 tensor it fills.

    ``target`` is formatted with the pattern's groups; ``expert`` is the group holding the expert index
    (the tensor fills one expert of a stacked ``[experts, ...]`` tensor) and ``block`` which block of it.
    """

    pattern: str
    target: str
    expert: int | None = None
    block: int | None = None


@dataclass(frozen=True)
class Family:
    """What seesaw_ds needs to know about one model family beyond transformers' own code and TP plan."""

    label: str
    model_types: tuple[str, ...]
    plan: Mapping[str, str] = field(default_factory=dict)       # additions to the config's TP plan
    blocks: Mapping[str, tuple[Split, ...]] = field(default_factory=dict)  # fused tensors' blocks
    sharded_norms: tuple[str, ...] = ()    # norms over all heads' features: all-reduced under TP
    embed_scale_sqrt_hidden: bool = False  # embeddings times sqrt(hidden), rounded to the weights' dtype
    embed_multiplier: str | None = None    # config attribute multiplying the embeddings
    logit_softcap: str | None = None       # config attribute: logits = cap * tanh(logits / cap)
    logit_divisor: str | None = None       # config attribute dividing the logits
    rope_per_layer_type: bool = False      # one rotary embedding per entry of config.layer_types
    handles: frozenset[str] = frozenset()  # FORWARD_FEATURES this family serves
    legacy: tuple[LegacyName, ...] = ()
    longrope_recomputes: bool = False      # transformers recomputes the cache when longrope switches factors
    features: str = ""                     # for the support table (docs/models.md)


def _experts_legacy(prefix: str, gate: str, up: str, down: str, router: tuple[str, str] | None = None):
    layer = r"^model\.layers\.(\d+)\."
    names = [
        LegacyName(rf"{layer}{prefix}\.experts\.(\d+)\.{gate}\.weight$", "model.layers.{0}.mlp.experts.gate_up_proj", 1, 0),
        LegacyName(rf"{layer}{prefix}\.experts\.(\d+)\.{up}\.weight$", "model.layers.{0}.mlp.experts.gate_up_proj", 1, 1),
        LegacyName(rf"{layer}{prefix}\.experts\.(\d+)\.{down}\.weight$", "model.layers.{0}.mlp.experts.down_proj", 1),
    ]
    if router:
        names.append(LegacyName(rf"{layer}{router[0]}$", "model.layers.{0}." + router[1]))
    return tuple(names)


_QWEN_MOE_LEGACY = _experts_legacy(r"mlp", "gate_proj", "up_proj", "down_proj")
_EXPERTS_PLAN = MappingProxyType({
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": EXPERTS_STYLE,
})
"""The fused experts' TP plan, as transformers 5.0-5.2x configs wrote it; newer releases dropped these entries
from ``base_model_tp_plan`` (5.25 plans experts for expert parallelism only, ``base_model_ep_plan``), so the
family table carries them for every MoE family."""
_SHARED_EXPERT_PLAN = MappingProxyType({
    **_EXPERTS_PLAN,
    "layers.*.mlp.shared_expert.gate_proj": "colwise",
    "layers.*.mlp.shared_expert.up_proj": "colwise",
    "layers.*.mlp.shared_expert.down_proj": "rowwise",
})

FAMILIES: tuple[Family, ...] = (
    Family("Llama 2/3.x", ("llama",), features="GQA, llama3/linear/dynamic/yarn rope, tied or untied"),
    Family("Mistral", ("mistral",), features="sliding window"),
    Family("Mixtral", ("mixtral",), plan=_EXPERTS_PLAN,
           legacy=_experts_legacy(r"block_sparse_moe", "w1", "w3", "w2",
                                  (r"block_sparse_moe\.gate\.weight", "mlp.gate.weight")),
           features="experts over TP (fused or per-expert checkpoints), sliding window"),
    Family("Qwen2/2.5", ("qwen2",), features="q/k/v biases, per-layer sliding window, tied embeddings"),
    Family("Qwen2-MoE", ("qwen2_moe",), plan=_SHARED_EXPERT_PLAN, legacy=_QWEN_MOE_LEGACY,
           features="experts + shared expert over TP, dense layers (mlp_only_layers, sparse step)"),
    Family("Qwen3", ("qwen3",), features="per-head q/k norms, head_dim != hidden/heads"),
    Family("Qwen3-MoE", ("qwen3_moe",), plan=_EXPERTS_PLAN, legacy=_QWEN_MOE_LEGACY, features="experts over TP, q/k norms"),
    Family("Gemma 2", ("gemma2",), embed_scale_sqrt_hidden=True, logit_softcap="final_logit_softcapping",
           handles=frozenset({"attn_logit_softcapping", "final_logit_softcapping"}),
           features="embedding scale, attention and final soft-cap, alternating sliding window"),
    Family("Gemma 3 (text)", ("gemma3_text",), embed_scale_sqrt_hidden=True,
           logit_softcap="final_logit_softcapping", rope_per_layer_type=True,
           handles=frozenset({"attn_logit_softcapping", "final_logit_softcapping"}),
           features="embedding scale, rope per layer type, sliding/full layers, q/k norms"),
    Family("Phi-3/3.5/4", ("phi3",),
           blocks={"self_attn.qkv_proj": (Split.HEADS, Split.KV_HEADS, Split.KV_HEADS),
                   "mlp.gate_up_proj": (Split.EVEN, Split.EVEN)},
           longrope_recomputes=True, features="fused qkv and gate/up split per block, longrope"),
    Family("OLMo 2", ("olmo2",),
           plan={"layers.*.self_attn.q_norm": "colwise", "layers.*.self_attn.k_norm": "colwise"},
           blocks={"self_attn.q_norm": (Split.HEADS,), "self_attn.k_norm": (Split.KV_HEADS,)},
           sharded_norms=("self_attn.q_norm", "self_attn.k_norm"),
           features="q/k norms over all heads (sum of squares all-reduced under TP)"),
    Family("Granite", ("granite",), embed_multiplier="embedding_multiplier", logit_divisor="logits_scaling",
           handles=frozenset({"embedding_multiplier", "logits_scaling", "residual_multiplier",
                              "attention_multiplier"}),
           features="embedding, residual, attention and logit multipliers"),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_summary() -> str:
    """One line listing the supported families and their model_types."""
    return ", ".join(f"{f.label} ({'/'.join(f.model_types)})" for f in FAMILIES)


def rope_types(config) -> dict[str | None, str]:
    """The rope type of the model, or of each layer type (Gemma 3), from ``config.rope_parameters``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return {layer_type: p.get("rope_type", p.get("type", "default")) for layer_type, p in params.items()}
    if not isinstance(params, dict):
        return {None: "default"}
    return {None: params.get("rope_type", params.get("type", "default"))}


def _layer_key(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``layers.*.mlp.up_proj.weight`` (the plans' key style)."""
    name = name[len("model."):] if name.startswith("model.") else name
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


@dataclass(frozen=True)
class ModelSpec:
    """A family bound to one checkpoint's config: the roles of its tensors and its per-rank configs."""

    family: Family
    config: object
    dims: ModelDims
    plan: Mapping[str, str]

    @property
    def length_switch(self) -> int | None:
        """Where transformers switches a longrope model to its long factors *and recomputes the cache*
        (Phi-3): a request whose prompt is at most this long but that may grow past it cannot be served
        exactly (seesaw_ds keeps the cache), so it is refused per request. None when nothing switches."""
        if not self.family.longrope_recomputes or "longrope" not in rope_types(self.config).values():
            return None
        params = getattr(self.config, "rope_parameters", None) or {}
        return int(params.get("original_max_position_embeddings")
                   or getattr(self.config, "original_max_position_embeddings"))

    @property
    def length_dependent_rope(self) -> bool:
        return any(kind in LENGTH_DEPENDENT_ROPE for kind in rope_types(self.config).values())

    def plan_style(self, name: str) -> str | None:
        """The TP-plan style of a tensor or module (``model.layers.N.<path>``), or None when unplanned."""
        key = _layer_key(name)
        if key in self.plan:
            return self.plan[key]
        return self.plan.get(key.rsplit(".", 1)[0]) if "." in key else None

    def is_experts(self, module_name: str) -> bool:
        return self.plan.get(_layer_key(module_name)) == EXPERTS_STYLE

    def is_sharded_norm(self, module_name: str) -> bool:
        return _layer_key(module_name).split(".", 2)[-1] in self.family.sharded_norms

    def role(self, name: str, shape: tuple[int, ...]) -> TensorRole:
        """How checkpoint tensor ``name`` (transformers-5 name, checkpoint ``shape``) shards under TP."""
        if not name.startswith("model.layers."):
            return REPLICATED
        style = self.plan_style(name)
        if style is None or style == EXPERTS_STYLE:
            return REPLICATED
        kind = PLAN_KINDS[style]
        if kind is ShardKind.REPLICATED:
            return REPLICATED
        is_bias = name.endswith(".bias")
        if kind is ShardKind.ROW:
            return REPLICATED if is_bias else TensorRole(ShardKind.ROW)
        path = _layer_key(name).split(".", 2)[-1]
        module = path.rsplit(".", 1)[0] if path.endswith((".weight", ".bias")) else path
        splits = self.family.blocks.get(module) or STANDARD_BLOCKS.get(module)
        if splits is None:
            splits = (Split.EVEN, Split.EVEN) if style == "packed_colwise" else (Split.EVEN,)
        size = shape[0] if len(shape) == 1 else shape[-2]
        return TensorRole(ShardKind.COLUMN, _block_sizes(splits, size, self.dims, name))

    def local_config(self, tp: int):
        """A copy of the config with one TP rank's heads and intermediate sizes (its layers are built from
        it, so the family's own reshapes and slices see the rank's shard)."""
        config = copy.deepcopy(self.config)
        if tp == 1:
            return config
        dims = self.dims
        config.head_dim = dims.head_dim
        config.num_attention_heads = dims.num_heads // tp
        config.num_key_value_heads = max(1, dims.num_kv_heads // tp)
        for attr in _INTERMEDIATE_SIZES:
            value = getattr(config, attr, None)
            if value:
                setattr(config, attr, value // tp)
        return config

    def check_tp(self, name: str, tp: int) -> None:
        """Raise LayoutError when layout ``name``'s ``tp`` cannot split this model's intermediate sizes."""
        for attr in _INTERMEDIATE_SIZES:
            value = getattr(self.config, attr, None)
            if value and value % tp:
                valid = [t for t in range(1, value + 1) if value % t == 0 and self.dims.num_heads % t == 0]
                raise LayoutError(f"parallel.{name}.tp={tp} does not divide the model's {attr}={value}; "
                                  f"use tp in {valid}")


_INTERMEDIATE_SIZES = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def _block_sizes(splits: tuple[Split, ...], size: int, dims: ModelDims, name: str) -> tuple[tuple[Split, int], ...]:
    """Sizes of a tensor's blocks: heads blocks are heads x head_dim, even blocks share the rest equally."""
    fixed = {Split.HEADS: dims.num_heads * dims.head_dim, Split.KV_HEADS: dims.num_kv_heads * dims.head_dim}
    num_even = sum(split is Split.EVEN for split in splits)
    rest = size - sum(fixed.get(split, 0) for split in splits)
    if rest < 0 or (num_even and rest % num_even) or (not num_even and rest):
        raise ModelNotSupported(f"{name}: {size} rows do not match its blocks {[s.value for s in splits]} "
                                f"(heads {dims.num_heads}, KV heads {dims.num_kv_heads}, head_dim {dims.head_dim})")
    return tuple((split, fixed.get(split, rest // max(1, num_even))) for split in splits)


def model_dims(config) -> ModelDims:
    """The dimensions seesaw_ds shards by, from a transformers config."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return ModelDims(num_layers=config.num_hidden_layers, num_heads=num_heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
                     head_dim=head_dim, hidden_size=config.hidden_size,
                     intermediate_size=getattr(config, "intermediate_size", None) or 0,
                     vocab_size=config.vocab_size)


def model_spec(config, where: str = "model.path") -> ModelSpec:
    """The family serving ``config``, checked against everything the table handles (ModelNotSupported)."""
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    supported = f"supported families: {supported_summary()}"
    family = _BY_MODEL_TYPE.get(model_type)
    named = f"model_type {model_type!r} ({', '.join(architectures) or 'no architectures'})"
    if any(hasattr(config, attr) for attr in ("text_config", "vision_config", "audio_config")):
        hint = " (for Gemma 3 use a text-only checkpoint, model_type gemma3_text)" if model_type == "gemma3" else ""
        raise ModelNotSupported(f"{where}: {named} is a multimodal model, not a text-only causal LM{hint}; "
                                f"{supported}")
    if family is None:
        raise ModelNotSupported(f"{where}: model_type {model_type!r} is not supported; {supported}")
    if any(not arch.endswith("ForCausalLM") for arch in architectures):
        raise ModelNotSupported(f"{where}: {named} is not a causal LM (…ForCausalLM); {supported}")
    for layer_type, kind in rope_types(config).items():
        if kind not in HANDLED_ROPE:
            where_rope = f"rope_parameters[{layer_type!r}]" if layer_type else "rope_parameters"
            raise ModelNotSupported(f"{where}: {family.label} with {where_rope} rope_type {kind!r} is not supported; "
                                    f"handled rope types: {', '.join(HANDLED_ROPE)}")
    for feature, off in FORWARD_FEATURES.items():
        value = getattr(config, feature, off)
        if value is not None and value != off and feature not in family.handles:
            raise ModelNotSupported(f"{where}: {family.label} with {feature}={value!r} is not supported "
                                    f"(seesaw_ds would ignore it and give wrong output)")
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    plan.update(family.plan)
    for key, style in plan.items():
        if style not in PLAN_KINDS and style != EXPERTS_STYLE:
            raise ModelNotSupported(f"{where}: {family.label}'s TP plan entry {key}={style!r} is not handled")
    return ModelSpec(family=family, config=config, dims=model_dims(config), plan=MappingProxyType(plan))


def legacy_target(name: str, family: Family) -> tuple[str, int | None, int | None] | None:
    """Where an old-style checkpoint tensor lands: (transformers-5 name, expert index, block), or None."""
    for legacy in family.legacy:
        match = re.match(legacy.pattern, name)
        if match:
            groups = match.groups()
            expert = int(groups[legacy.expert]) if legacy.expert is not None else None
            return legacy.target.format(*groups), expert, legacy.block
    return None
