"""Checkpoint hygiene, from metadata only: the index names the files (a stray consolidated.safetensors is
ignored), a tensor in two files is an error, model.dtype=auto is the config's dtype, and every parameter is
checked by name and shape against the config before any weight is read."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seesaw_ds.model.loader import CheckpointError, open_checkpoint, parse_dtype
from seesaw_ds.model.template import check_weights


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from seesaw_ds.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ckpt") / "llama", "llama", num_layers=2)


def _copy(src, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(src, target)
    return target


def test_index_names_the_files_and_a_stray_consolidated_file_is_ignored(llama_dir, tmp_path):
    model = _copy(llama_dir, tmp_path)
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    first = {n: tensors[n] for n in names[: len(names) // 2]}
    second = {n: tensors[n] for n in names[len(names) // 2:]}
    (model / "model.safetensors").unlink()
    save_file(first, model / "model-00001-of-00002.safetensors")
    save_file(second, model / "model-00002-of-00002.safetensors")
    save_file({"tok_embeddings.weight": tensors["model.embed_tokens.weight"]}, model / "consolidated.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    checkpoint = open_checkpoint(model)
    assert set(checkpoint.tensors) == set(names)
    check_weights(checkpoint)
    # without the index, the consolidated file is still not read as part of the model
    (model / "model.safetensors.index.json").unlink()
    assert set(open_checkpoint(model).tensors) == set(names)


def test_index_naming_a_missing_file_is_an_error(llama_dir, tmp_path):
    model = _copy(llama_dir, tmp_path)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        open_checkpoint(model)


def test_only_a_consolidated_file_is_refused(llama_dir, tmp_path):
    model = _copy(llama_dir, tmp_path)
    (model / "model.safetensors").rename(model / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match="native format"):
        open_checkpoint(model)


def test_a_tensor_in_two_files_is_an_error(llama_dir, tmp_path):
    model = _copy(llama_dir, tmp_path)
    shutil.copy(model / "model.safetensors", model / "model-extra.safetensors")
    with pytest.raises(CheckpointError, match="in both"):
        open_checkpoint(model)


def test_dtype_auto_is_the_configs(llama_dir, tmp_path):
    model = _copy(llama_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (model / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(model)
    assert next(iter(checkpoint.tensors.values())).dtype == torch.float32  # stored fp32
    assert parse_dtype("auto", checkpoint.config_dtype) == torch.bfloat16
    assert parse_dtype("float32", checkpoint.config_dtype) == torch.float32


def test_missing_tensor_and_wrong_shape_are_found_from_metadata(llama_dir, tmp_path):
    model = _copy(llama_dir, tmp_path)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks model.layers.1.mlp.up_proj.weight"):
        check_weights(open_checkpoint(model))
    model = _copy(llama_dir, tmp_path / "again")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        check_weights(open_checkpoint(model))
