"""The model template and the checks that need only it and a checkpoint's metadata.

The template is transformers' own model for a config, instantiated on the ``meta`` device (no memory) and
wired to seesaw's attention function; each layout's stage is built from it (:mod:`seesaw_ds.model.stage`).
This module imports no DeepSpeed, so the launcher can check a job (layouts against the model, every
parameter's name and shape against the checkpoint) before any rank, or DeepSpeed, starts.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from seesaw_ds.distributed.layout import Layout, validate_named_layouts
from seesaw_ds.model.attention import register as register_attention
from seesaw_ds.model.loader import Checkpoint, plan_host_tensors


def build_template(config) -> nn.Module:
    """The full model on the meta device, wired to seesaw's attention function."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = register_attention()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    return model.eval()


def parameter_shapes(template: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter of the template (tied ones once), by transformers-5 name."""
    return {name: tuple(param.shape) for name, param in template.named_parameters()}


def validate_model_layouts(checkpoint: Checkpoint, layouts: dict[str, Layout], world_size: int) -> int:
    """Every named layout against the model (heads, layers, the family's intermediate sizes) and the job's
    ranks; returns the number of instances (LayoutError naming the value and the fix)."""
    instances = validate_named_layouts(layouts, checkpoint.dims, world_size)
    for name, layout in layouts.items():
        checkpoint.spec.check_tp(name, layout.tp)
    return instances


def check_weights(checkpoint: Checkpoint) -> None:
    """Every parameter of the model present in the checkpoint with its shape (metadata only; CheckpointError)."""
    plan_host_tensors(checkpoint, parameter_shapes(build_template(checkpoint.config)))
