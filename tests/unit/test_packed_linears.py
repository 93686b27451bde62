"""oneDNN-prepacked bf16 linears (backends/deepspeed.pack_cpu_linears) give the same bits as the views they
replace, for AutoTP's column and row linears and a plain nn.Linear, on the real model's decode and prefill
shapes; float32 stages and other devices are left alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from seesaw_ds.backends import deepspeed as backend

pytestmark = pytest.mark.skipif(not backend.can_pack_cpu_linears(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN")


def _layers(dtype):
    torch.manual_seed(0)
    column = backend.column_linear((960, 576), torch.randn(960, 576).to(dtype), None, None, "qkv")
    biased = backend.column_linear((192, 576), torch.randn(192, 576).to(dtype), torch.randn(192).to(dtype), None,
                                   "k_proj")
    host = torch.randn(576, 3072).to(dtype)  # a row shard is a view into a wider host tensor
    row = backend.row_linear((576, 1536), host[:, :1536], None, None, "down_proj")
    head = nn.Linear(576, 4099, bias=False).to(dtype)
    return nn.ModuleDict(dict(column=column, biased=biased, row=row, head=head))


@pytest.mark.parametrize("shape", [(1, 37, 576), (64, 1, 576), (3, 576), (1, 1, 576)])
def test_packed_linears_are_bit_identical(shape):
    layers = _layers(torch.bfloat16)
    x = torch.randn(*shape).bfloat16()
    x_row = torch.randn(*shape[:-1], 1536).bfloat16()
    want = {name: layer(x_row if name == "row" else x) for name, layer in layers.items()}
    views = {name: layer.weight.data_ptr() for name, layer in layers.items()}
    packed_bytes = backend.pack_cpu_linears(layers)
    assert packed_bytes == sum(layer.weight.numel() * 2 for layer in layers.values())
    for name, layer in layers.items():
        assert type(layer).__name__.startswith("Packed"), name
        assert layer.weight.data_ptr() == views[name]  # the view of the host copy stays
        got = layer(x_row if name == "row" else x)
        assert got.shape == want[name].shape and torch.equal(got, want[name]), name


def test_only_bf16_on_cpu_is_packed():
    assert not backend.can_pack_cpu_linears(torch.device("cpu"), torch.float32)
    assert not backend.can_pack_cpu_linears(torch.device("cuda"), torch.bfloat16)
    layers = _layers(torch.float32)
    assert backend.pack_cpu_linears(layers) == 0
    assert not any(type(layer).__name__.startswith("Packed") for layer in layers.values())
