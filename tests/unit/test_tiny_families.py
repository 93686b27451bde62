"""Tests for tests/tiny_families.py: every family's tiny checkpoint builds, loads back in transformers,
has decisive greedy logits and really uses its family's features; legacy per-expert MoE checkpoints equal the
fused ones; unsupported checkpoints are what they claim."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import tiny_families as tf
from seesaw_ds.model import tiny

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM",
}
PER_EXPERT = sorted(case for case, spec in tf.CASES.items() if "per_expert_of" in spec)
MIN_GAP = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def loaded(family_models):
    return {case: AutoModelForCausalLM.from_pretrained(path).eval() for case, path in family_models.items()}


@pytest.fixture(scope="module")
def prompts():
    return tf.gap_prompts()


def _keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def test_cases_cover_the_families():
    model_types = {spec["model_type"] for spec in tf.CASES.values()}
    assert model_types == set(ARCHITECTURES)
    assert set(PER_EXPERT) == {"mixtral_per_expert", "qwen2_moe_per_expert", "qwen3_moe_per_expert"}
    for case in tf.CASES:
        config = tf.make_config(case)
        assert config.hidden_size == 64 and config.num_attention_heads == 4 and config.vocab_size == 1024
        assert config.num_hidden_layers in (3, 5)
        assert config.max_position_embeddings == (20 if case == "llama_dynamic" else 512)
        assert config.num_key_value_heads == (4 if case == "llama2" else 2)


@pytest.mark.parametrize("case", sorted(tf.CASES))
def test_case_builds_and_loads_back(family_models, loaded, prompts, case):
    path = family_models[case]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", tf.MANIFEST_NAME):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.bin"))
    config = json.loads((path / "config.json").read_text())
    model_type = tf.CASES[case]["model_type"]
    assert config["model_type"] == model_type and config["architectures"] == [ARCHITECTURES[model_type]]
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)
    model = loaded[case]
    assert type(model).__name__ == ARCHITECTURES[model_type]
    built, _ = tf.build_family_model(case)
    ids = torch.tensor([prompts[-1]])
    with torch.no_grad():
        # not bit-equal: the loaded weights sit at other alignments, which changes some BLAS reduction orders
        torch.testing.assert_close(model(ids).logits, built(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_fused_cases_hold_fused_expert_keys(family_models, case):
    keys = _keys(family_models[case])
    config = tf.make_config(case)
    inter = config.intermediate_size if case == "mixtral" else config.moe_intermediate_size
    assert keys["model.layers.1.mlp.experts.gate_up_proj"] == (4, 2 * inter, 64)
    assert keys["model.layers.1.mlp.experts.down_proj"] == (4, 64, inter)
    assert keys["model.layers.1.mlp.gate.weight"] == (4, 64)
    assert not any(".experts.0." in key or "block_sparse_moe" in key for key in keys)


@pytest.mark.parametrize("case", PER_EXPERT)
def test_per_expert_case_is_the_same_model(family_models, loaded, prompts, tmp_path, case):
    base = tf.CASES[case]["per_expert_of"]
    keys = _keys(family_models[case])
    legacy = tf.LEGACY_EXPERT_KEYS[tf.CASES[case]["model_type"]]
    layer = f"model.layers.1.{legacy['module']}"
    inter = keys[f"{layer}.experts.0.{legacy['gate']}.weight"][0]
    assert keys[f"{layer}.experts.3.{legacy['up']}.weight"] == (inter, 64)
    assert keys[f"{layer}.experts.3.{legacy['down']}.weight"] == (64, inter)
    assert keys[f"{layer}.gate.weight"] == (4, 64)
    assert not any("gate_up_proj" in key or key.endswith("experts.down_proj") for key in keys)
    # exactly the names (and tensors) transformers' own reverting save_pretrained writes
    model, _ = tf.build_family_model(base)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as ours, \
            safe_open(family_models[case] / "model.safetensors", "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        for key in ours.keys():
            assert torch.equal(ours.get_tensor(key), theirs.get_tensor(key)), key
    # and transformers loads it into the identical model
    ids = torch.tensor([prompts[-1]])
    with torch.no_grad():
        assert torch.equal(loaded[case](ids).logits, loaded[base](ids).logits)
    fused, per_expert = loaded[base].state_dict(), loaded[case].state_dict()
    assert fused.keys() == per_expert.keys()
    assert all(torch.equal(fused[key], per_expert[key]) for key in fused)


@pytest.mark.parametrize("case", sorted(tf.CASES))
def test_greedy_logits_are_decisive_and_context_dependent(loaded, prompts, case):
    result = tf.check_greedy(loaded[case], prompts, max_new_tokens=16)
    assert result["min_gap"] > MIN_GAP, result
    outputs = result["outputs"]
    assert all(len(set(ids)) > 2 for ids in outputs), outputs  # not one token repeated
    assert len({tuple(ids) for ids in outputs}) == len(outputs), outputs
    if result["router_margin"] is not None:
        assert result["router_margin"] > 1e-4, result["router_margin"]


_LONGROPE_SAME_FACTORS = {**tf.CASES["phi3_longrope"]["config"]["rope_parameters"],
                          "long_factor": tf.CASES["phi3_longrope"]["config"]["rope_parameters"]["short_factor"]}
ABLATIONS = [
    ("llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    ("mistral", {"sliding_window": None}),
    ("mixtral", {"num_experts_per_tok": 1}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 32}),
    ("gemma2", {"layer_types": ["full_attention"] * 5}),
    ("gemma3", {"layer_types": ["full_attention"] * 5}),
    ("gemma3", {"query_pre_attn_scalar": 32}),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}),
    ("phi3_longrope", {"rope_parameters": _LONGROPE_SAME_FACTORS}),
    ("granite", {"embedding_multiplier": 1.0}),
    ("granite", {"residual_multiplier": 1.0}),
    ("granite", {"attention_multiplier": 0.25}),
]


@pytest.mark.parametrize(("case", "change"), ABLATIONS, ids=[f"{c}-{next(iter(ch))}" for c, ch in ABLATIONS])
def test_family_features_change_the_greedy_tokens(loaded, prompts, case, change):
    """An engine that ignored the feature would fail a token-exact test on these prompts. (Monotone output
    transforms -- Gemma's final soft-capping, Granite's logits_scaling -- cannot change greedy tokens: they
    need a logits or sampling comparison.)"""
    model = loaded[case]
    config = copy.deepcopy(model.config)
    for key, value in change.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        other = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    other.load_state_dict(model.state_dict(), strict=True)
    other.eval().generation_config = model.generation_config
    expected = tf.check_greedy(model, prompts)["outputs"]
    assert tf.check_greedy(other, prompts)["outputs"] != expected


def test_longrope_reference_is_the_whole_sequence_on_one_factor_set(loaded, prompts):
    """transformers' generate with a KV cache equals a fresh full forward at every step: on crossing
    original_max_position_embeddings the cache is recomputed with the long factors (module docstring)."""
    model = loaded["phi3_longrope"]
    assert model.config.rope_parameters["original_max_position_embeddings"] == tf.LONGROPE_ORIGINAL_MAX
    prompt = torch.tensor([prompts[-1]])  # 17 tokens + 16 new: crosses 24 during decoding
    result = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    assert result.sequences.shape[1] > tf.LONGROPE_ORIGINAL_MAX + 1
    with torch.no_grad():
        for step, logits in enumerate(result.logits):
            full = model(result.sequences[:, :prompt.shape[1] + step], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=0, atol=1e-3)


def test_longrope_case_catches_keys_left_on_the_short_factors(loaded, prompts):
    """Keeping the keys cached before the switch (rotated with the short factors) changes the greedy tokens
    of the prompts that cross original_max_position_embeddings while decoding: an engine must recompute them."""
    import types

    from transformers.generation.utils import GenerationMixin

    model = loaded["phi3_longrope"]
    expected = tf.check_greedy(model, prompts)["outputs"]
    generic = copy.copy(model)  # shallow: shares the modules; only the bound method differs
    generic.prepare_inputs_for_generation = types.MethodType(GenerationMixin.prepare_inputs_for_generation, generic)
    stale = tf.check_greedy(generic, prompts)["outputs"]
    crossing = [i for i, p in enumerate(prompts) if len(p) + 16 > tf.LONGROPE_ORIGINAL_MAX + 1]
    assert all(stale[i] == expected[i] for i in range(len(prompts)) if i not in crossing)
    assert any(stale[i] != expected[i] for i in crossing)


def test_same_arguments_give_identical_bytes(family_models, tmp_path):
    for case in ("mixtral_per_expert", "gemma3"):
        again = tf.make_family_checkpoint(case, tmp_path / case)
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     tf.MANIFEST_NAME):
            assert (again / name).read_bytes() == (family_models[case] / name).read_bytes(), (case, name)
    other, _ = tf.build_family_model("gemma3", seed=1)
    same, _ = tf.build_family_model("gemma3")
    assert not torch.equal(other.model.embed_tokens.weight, same.model.embed_tokens.weight)


def test_bf16_build(tmp_path):
    path = tf.make_family_checkpoint("qwen3", tmp_path / "qwen3", dtype=torch.bfloat16)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def test_global_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tf.build_family_model("qwen2_moe")
    tf.make_unsupported_checkpoint("gpt2", tmp_path / "gpt2")
    assert torch.equal(torch.rand(4), expected)


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown case"):
        tf.make_family_checkpoint("gpt5", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown unsupported kind"):
        tf.make_unsupported_checkpoint("llama", tmp_path / "y")


@pytest.mark.parametrize(("kind", "model_type", "architecture"), [
    ("gpt2", "gpt2", "GPT2LMHeadModel"),
    ("gemma3_multimodal", "gemma3", "Gemma3ForConditionalGeneration"),
    ("rope_unhandled", "llama", "LlamaForCausalLM"),
])
def test_unsupported_checkpoints(tmp_path, kind, model_type, architecture):
    path = tf.make_unsupported_checkpoint(kind, tmp_path / kind)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    assert (path / "model.safetensors").stat().st_size < 2_000_000
    if kind == "rope_unhandled":
        assert config["rope_parameters"]["rope_type"] == "proportional"
    if kind == "gemma3_multimodal":
        assert config["vision_config"]["model_type"] == "siglip_vision_model"
        assert any(key.startswith("vision_tower.") for key in _keys(path))
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # transformers itself runs every one of them
    assert type(model).__name__ == architecture
    with torch.no_grad():
        assert model(torch.tensor([[1, 50, 60]])).logits.shape == (1, 3, tiny.TOKENIZER_VOCAB_SIZE)
