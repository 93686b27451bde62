"""Tests for seesaw_ds.model.tiny: deterministic tiny checkpoints, decisive logits, tokenizer and chat template."""

from __future__ import annotations

import json
import os
import statistics
import threading
from importlib import resources

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from seesaw_ds.model import tiny

# Built once per module: the three families, mistral with an uneven layer count and a sliding window.
_BUILDS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"num_layers": 5, "sliding_window": 16}),
    "qwen2": ("qwen2", {}),
}


def _sample_lines() -> list[dict]:
    text = resources.files("seesaw_ds").joinpath("data", "sample_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: tiny.make_tiny_model(root / name, family, **kw) for name, (family, kw) in _BUILDS.items()}


@pytest.fixture(scope="module")
def loaded(built):
    return {name: (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
            for name, path in built.items()}


def test_same_arguments_give_byte_identical_checkpoints(built, tmp_path):
    again = tiny.make_tiny_model(tmp_path / "again", "llama")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json",
                 "chat_template.jinja", tiny.MANIFEST_NAME):
        assert (again / name).read_bytes() == (built["llama"] / name).read_bytes(), name
    other_seed, _ = tiny.build_tiny_model("llama", seed=1)
    same_seed = AutoModelForCausalLM.from_pretrained(built["llama"])
    assert not torch.equal(other_seed.lm_head.weight, same_seed.lm_head.weight)


def test_checkpoint_is_safetensors_only_and_complete(built):
    for path in built.values():
        assert tiny.is_complete_checkpoint(path)
        assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
        generation = json.loads((path / "generation_config.json").read_text())
        assert generation["eos_token_id"] == 2 and "temperature" not in generation and "do_sample" not in generation


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny.build_tiny_model("qwen2", num_layers=1)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", sorted(_BUILDS))
def test_each_family_loads_and_generates(loaded, name):
    model, tokenizer = loaded[name]
    family, kw = _BUILDS[name]
    assert model.config.model_type == family
    assert model.config.num_hidden_layers == kw.get("num_layers", 3) == len(model.model.layers)
    assert model.config.vocab_size == len(tokenizer) == tiny.TOKENIZER_VOCAB_SIZE
    ids = tokenizer("The river ran quietly under the bridge.", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(out[0, ids.shape[1]:]), str)


@pytest.mark.parametrize("name", sorted(_BUILDS))
def test_greedy_decoding_is_decisive_and_prompt_dependent(loaded, name):
    model, tokenizer = loaded[name]
    prompts = [line["prompt"] for line in _sample_lines() if "prompt" in line][:8]
    min_gap, outputs = tiny.greedy_top2_gaps(model, tokenizer, prompts, max_new_tokens=32)
    assert min_gap > 1e-3
    assert len({tuple(out) for out in outputs}) == len(prompts)  # every prompt gives its own continuation
    assert all(len(set(out)) > 1 for out in outputs)  # never one token repeated throughout
    # Typical gap: next-token logits over a stretch of English text.
    ids = tokenizer(tiny.load_tokenizer_corpus()[:2000], return_tensors="pt").input_ids
    with torch.no_grad():
        top2 = model(ids).logits[0].topk(2, dim=-1).values
    assert statistics.median((top2[:, 0] - top2[:, 1]).tolist()) > 1e-2


def test_tokenizer_round_trips_any_text(loaded):
    _, tokenizer = loaded["llama"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        1, 2, 3, 0)
    for text in ("The quick brown fox jumps over the lazy dog.", "  spaces\nnew lines\ttabs  ",
                 "ünïcödé, 日本語, emoji 🙂 and control \x00 bytes", ""):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    english = "The children walked to the library after school and read about rivers."
    assert len(tokenizer(english).input_ids) < len(english) / 2  # the BPE learned English pieces


def test_chat_template(loaded):
    _, tokenizer = loaded["qwen2"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello there!</s>\n<|assistant|>\n"
    closed = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert closed == text.removesuffix("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens.count("<s>") == 1 and tokens[0] == "<s>"
    assert tokens[-2] == "<|assistant|>" and tokens.count("</s>") == 2


def test_gqa_shapes(loaded):
    model, _ = loaded["llama"]
    config = model.config
    assert config.num_key_value_heads == 2 < config.num_attention_heads == 4
    attn = model.model.layers[0].self_attn
    head_dim = config.hidden_size // config.num_attention_heads
    assert attn.q_proj.weight.shape == (4 * head_dim, config.hidden_size)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * head_dim, config.hidden_size)


def test_qwen2_has_qkv_biases_and_tied_embeddings(built, loaded):
    model, _ = loaded["qwen2"]
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.bias is not None and proj.bias.abs().sum() > 0
        assert layer.self_attn.o_proj.bias is None
    with safe_open(str(built["qwen2"] / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    llama, _ = loaded["llama"]
    assert not llama.config.tie_word_embeddings and llama.model.layers[0].self_attn.q_proj.bias is None


def test_mistral_uneven_layers_and_sliding_window(loaded):
    model, _ = loaded["mistral"]
    assert len(model.model.layers) == 5 and model.config.sliding_window == 16
    assert tiny.build_tiny_model("mistral", num_layers=1)[0].config.sliding_window is None


def test_vocab_padding_and_validation():
    model, tokenizer = tiny.build_tiny_model("llama", num_layers=1, vocab_size=1088)
    assert model.config.vocab_size == 1088
    assert model.lm_head.weight[len(tokenizer):].abs().sum() == 0
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny.build_tiny_model("llama", vocab_size=100)
    with pytest.raises(ValueError, match="divisible"):
        tiny.build_tiny_model("llama", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown family"):
        tiny.build_tiny_model("gpt2")


def test_benchmark_preset_builds():
    model, _ = tiny.build_tiny_model("llama", **tiny.BENCHMARK_MODEL_KWARGS)
    assert sum(p.numel() for p in model.parameters()) == 24_257_024
    assert model.config.max_position_embeddings == 2048 and model.config.num_key_value_heads == 4


def test_default_model_parameter_count(built):
    manifest = tiny.read_manifest(built["llama"])
    assert manifest["num_parameters"] == 242_112 and manifest["family"] == "llama"


def test_ensure_default_model_is_idempotent_and_repairs(tmp_path):
    path = tiny.ensure_default_model(tmp_path)
    assert path == tmp_path / tiny.DEFAULT_MODEL_NAME and tiny.is_complete_checkpoint(path)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny.ensure_default_model(tmp_path) == path and weights.stat().st_mtime_ns == stamp  # not rebuilt
    weights.unlink()  # incomplete: rebuilt
    assert tiny.is_complete_checkpoint(tiny.ensure_default_model(tmp_path))
    manifest = json.loads((path / tiny.MANIFEST_NAME).read_text())
    (path / tiny.MANIFEST_NAME).write_text(json.dumps({**manifest, "manifest_version": -1}))  # stale: rebuilt
    tiny.ensure_default_model(tmp_path)
    assert tiny.read_manifest(path)["manifest_version"] == tiny.MANIFEST_VERSION
    assert sorted(os.listdir(tmp_path)) == [tiny.DEFAULT_MODEL_NAME]  # no temporary directories left behind


def test_ensure_default_model_concurrent_callers(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(tiny.ensure_default_model(tmp_path))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert tiny.is_complete_checkpoint(results[0])
    assert sorted(os.listdir(tmp_path)) == [tiny.DEFAULT_MODEL_NAME]


def test_sample_prompts_file():
    lines = _sample_lines()
    assert len(lines) == 24 and len({line["custom_id"] for line in lines}) == 24
    tokenizer = tiny.build_tokenizer()
    for line in lines:
        assert ("prompt" in line) != ("messages" in line)
        if "prompt" in line:
            assert 5 <= len(line["prompt"].split()) <= 60
        else:
            assert tokenizer.apply_chat_template(line["messages"], add_generation_prompt=True, tokenize=False)
    assert sum("messages" in line for line in lines) >= 3
