"""The family table against transformers' real config classes: roles of every tensor kind, local configs,
and refusals (pure: configs only, no weights, no processes)."""
from __future__ import annotations

import pytest

from seesaw_ds.distributed.layout import LayoutError
from seesaw_ds.model.families import FAMILIES, ModelNotSupported, legacy_target, model_spec, supported_summary
from seesaw_ds.model.shards import ShardKind, Split


def _spec(config):
    return model_spec(config)


def _config(model_type: str, **overrides):
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, head_dim=16)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def test_llama_roles_come_from_transformers_plan():
    spec = _spec(_config("llama"))
    q = spec.role("model.layers.0.self_attn.q_proj.weight", (64, 64))
    assert q.kind is ShardKind.COLUMN and q.blocks == ((Split.HEADS, 64),)
    assert spec.role("model.layers.2.self_attn.k_proj.weight", (32, 64)).blocks == ((Split.KV_HEADS, 32),)
    assert spec.role("model.layers.1.self_attn.o_proj.weight", (64, 64)).kind is ShardKind.ROW
    assert spec.role("model.layers.1.self_attn.o_proj.bias", (64,)).kind is ShardKind.REPLICATED
    assert spec.role("model.layers.1.mlp.up_proj.weight", (128, 64)).blocks == ((Split.EVEN, 128),)
    assert spec.role("model.layers.1.input_layernorm.weight", (64,)).kind is ShardKind.REPLICATED
    assert spec.role("model.embed_tokens.weight", (256, 64)).kind is ShardKind.REPLICATED


def test_a_vocab_split_embedding_in_the_plan_is_served_whole():
    """transformers 5.17 adds embed_tokens='embedding_rowwise' to a tied model's plan: every rank keeps the
    embedding whole (the same output), and a style nobody handles is still refused."""
    config = _config("qwen2", tie_word_embeddings=True)
    config.base_model_tp_plan = {**config.base_model_tp_plan, "embed_tokens": "embedding_rowwise"}
    spec = _spec(config)
    assert spec.role("model.embed_tokens.weight", (256, 64)).kind is ShardKind.REPLICATED
    assert spec.role("model.layers.0.mlp.down_proj.weight", (64, 128)).kind is ShardKind.ROW
    config.base_model_tp_plan = {**config.base_model_tp_plan, "embed_tokens": "sequence_parallel_made_up"}
    with pytest.raises(ModelNotSupported, match="embed_tokens='sequence_parallel_made_up' is not handled"):
        _spec(config)


def test_fused_phi3_blocks_and_local_config():
    spec = _spec(_config("phi3"))
    qkv = spec.role("model.layers.0.self_attn.qkv_proj.weight", (128, 64))
    assert qkv.blocks == ((Split.HEADS, 64), (Split.KV_HEADS, 32), (Split.KV_HEADS, 32))
    assert spec.role("model.layers.0.mlp.gate_up_proj.weight", (256, 64)).blocks == ((Split.EVEN, 128),) * 2
    local = spec.local_config(2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim, local.intermediate_size) == \
        (2, 1, 16, 64)
    assert spec.config.num_attention_heads == 4  # the original is untouched


def test_moe_experts_and_shared_expert():
    spec = _spec(_config("qwen2_moe", moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4))
    gate_up = spec.role("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 64))
    assert gate_up.kind is ShardKind.COLUMN and gate_up.blocks == ((Split.EVEN, 32),) * 2
    assert spec.role("model.layers.0.mlp.experts.down_proj", (4, 64, 32)).kind is ShardKind.ROW
    assert spec.is_experts("model.layers.0.mlp.experts")
    assert spec.role("model.layers.0.mlp.gate.weight", (4, 64)).kind is ShardKind.REPLICATED
    assert spec.role("model.layers.0.mlp.shared_expert.down_proj.weight", (64, 64)).kind is ShardKind.ROW
    assert spec.role("model.layers.0.mlp.shared_expert_gate.weight", (1, 64)).kind is ShardKind.REPLICATED
    local = spec.local_config(2)
    assert (local.moe_intermediate_size, local.shared_expert_intermediate_size) == (16, 32)
    odd = _spec(_config("qwen2_moe", moe_intermediate_size=36, shared_expert_intermediate_size=64, num_experts=4))
    with pytest.raises(LayoutError, match="parallel.decode.tp=8 does not divide the model's moe_intermediate_size=36"):
        odd.check_tp("decode", 8)


def test_olmo2_norms_shard_with_their_heads():
    spec = _spec(_config("olmo2"))
    assert spec.role("model.layers.0.self_attn.q_norm.weight", (64,)).blocks == ((Split.HEADS, 64),)
    assert spec.role("model.layers.0.self_attn.k_norm.weight", (32,)).blocks == ((Split.KV_HEADS, 32),)
    assert spec.is_sharded_norm("model.layers.0.self_attn.q_norm")


def test_legacy_expert_names_land_in_fused_tensors():
    mixtral = next(f for f in FAMILIES if "mixtral" in f.model_types)
    assert legacy_target("model.layers.3.block_sparse_moe.experts.5.w3.weight", mixtral) == \
        ("model.layers.3.mlp.experts.gate_up_proj", 5, 1)
    assert legacy_target("model.layers.3.block_sparse_moe.experts.5.w2.weight", mixtral) == \
        ("model.layers.3.mlp.experts.down_proj", 5, None)
    assert legacy_target("model.layers.0.block_sparse_moe.gate.weight", mixtral) == \
        ("model.layers.0.mlp.gate.weight", None, None)
    assert legacy_target("model.layers.0.mlp.gate_proj.weight", mixtral) is None


@pytest.mark.parametrize("model_type, overrides, match", [
    ("gpt2", {}, "model_type 'gpt2' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "made_up", "rope_theta": 1e4}}, "rope_type 'made_up'"),
    ("llama", {"logits_scaling": 2.0}, "logits_scaling=2.0"),
])
def test_refusals_name_the_problem_and_the_families(model_type, overrides, match):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ModelNotSupported, match=match) as error:
        _spec(config) if model_type != "gpt2" else model_spec(config)
    assert "\n" not in str(error.value)
    if model_type == "gpt2":
        assert "Granite (granite)" in str(error.value) and supported_summary() in str(error.value)


def test_multimodal_wrapper_is_refused():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3")
    with pytest.raises(ModelNotSupported, match="gemma3_text"):
        model_spec(config)


def test_support_table_in_docs_matches_the_family_table_and_the_tested_cases():
    """docs/models.md lists every family of the table and every case the multi-rank tests run, and nothing else."""
    import re
    from pathlib import Path

    from tiny_families import CASES

    text = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    rows = re.findall(r"^\| ([^|`]+?) \| (`[^|]+`) \|", text, flags=re.M)
    assert [label for label, _ in rows] == [f.label for f in FAMILIES]
    cases = re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.M)
    assert cases == list(CASES)
    assert {c["model_type"] for c in CASES.values()} == {t for f in FAMILIES for t in f.model_types}


def test_parallel_auto_only_considers_layouts_the_family_can_shard(tmp_path):
    from seesaw_ds.distributed.layout import Layout
    from seesaw_ds.sim.auto import family_usable

    _config("qwen2_moe", moe_intermediate_size=36, shared_expert_intermediate_size=64,
            num_experts=4).save_pretrained(tmp_path)
    usable = family_usable(tmp_path)
    assert usable(Layout(tp=2)) and usable(Layout(pp=4)) and not usable(Layout(tp=8))
