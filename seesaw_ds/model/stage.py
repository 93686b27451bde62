"""One rank's slice of the model under one layout, built from transformers' own modules.

The model is instantiated once on the ``meta`` device (no memory) as a template. For a layout, this rank's
pipeline stage gets deep copies of its decoder layers whose linears are replaced by AutoTP's
``LinearLayer``/``LinearAllreduce`` holding views of the node-shared host copy, plus the embedding on the
first stage and the final norm and ``lm_head`` on the last. Building a stage copies no weight bytes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.distributed.groups import LayoutGroups
from seesaw_ds.distributed.layout import ModelDims, layer_range
from seesaw_ds.model.attention import register as register_attention
from seesaw_ds.model.loader import HostWeights
from seesaw_ds.model.shards import ShardKind, shard_rows


def build_template(config) -> nn.Module:
    """The full model on the meta device, wired to seesaw's attention function."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = register_attention()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    return model.eval()


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _shard(host: HostWeights, name: str, dims: ModelDims, groups: LayoutGroups) -> torch.Tensor:
    tensor = host.get(name)
    role = host.roles.get(name)
    if role is None or role.kind is ShardKind.REPLICATED:
        return tensor
    rows = shard_rows(role.kind, tensor.shape[0], dims, groups.layout.tp, groups.tp_index, role.module)
    return tensor[rows.start:rows.stop]


class StageModel(nn.Module):
    """This rank's modules under one layout: embedding (first stage), layers, norm and head (last stage)."""

    def __init__(self, template: nn.Module, host: HostWeights, dims: ModelDims, groups: LayoutGroups,
                 row_parallel: frozenset[str], device: torch.device):
        super().__init__()
        self.groups = groups
        self.device = device
        self.layer_ids = layer_range(dims.num_layers, groups.layout.pp, groups.pp_index)
        self.host_params: list[tuple[nn.Module, str, torch.Tensor]] = []
        base = template.model
        self.embed = self._replicated(copy.deepcopy(base.embed_tokens), "model.embed_tokens", host) \
            if groups.is_first_stage else None
        self.layers = nn.ModuleList(
            self._layer(base.layers[i], i, host, dims, groups, row_parallel) for i in self.layer_ids)
        if groups.is_last_stage:
            self.norm = self._replicated(copy.deepcopy(base.norm), "model.norm", host)
            self.lm_head = self._replicated(copy.deepcopy(template.lm_head), "lm_head", host)
        else:
            self.norm = self.lm_head = None
        rotary_class = type(base.rotary_emb)
        self.rotary = rotary_class(config=template.config)

    def _bind(self, module: nn.Module, param: str, tensor: torch.Tensor) -> None:
        setattr(module, param, nn.Parameter(tensor, requires_grad=False))
        self.host_params.append((module, param, tensor))

    def _replicated(self, module: nn.Module, prefix: str, host: HostWeights) -> nn.Module:
        for param, _ in list(module.named_parameters(recurse=False)):
            self._bind(module, param, host.get(f"{prefix}.{param}"))
        return module

    def _layer(self, template_layer: nn.Module, index: int, host: HostWeights, dims: ModelDims,
               groups: LayoutGroups, row_parallel: frozenset[str]) -> nn.Module:
        layer = copy.deepcopy(template_layer)
        prefix = f"model.layers.{index}"
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                weight = _shard(host, f"{prefix}.{name}.weight", dims, groups)
                bias = _shard(host, f"{prefix}.{name}.bias", dims, groups) if child.bias is not None else None
                full = (child.out_features, child.in_features)
                group = groups.tp_group
                if name in row_parallel:
                    new = backend.row_linear(full, weight.t(), bias, group, name)
                elif name.endswith(("k_proj", "v_proj")) and groups.layout.tp > dims.num_kv_heads:
                    new = backend.replicated_linear(weight, bias, name)
                else:
                    new = backend.column_linear(full, weight, bias, group, name)
                _set_submodule(layer, name, new)
                self.host_params.append((new, "weight", new.weight.data))
                if bias is not None:
                    self.host_params.append((new, "bias", new.bias.data))
            elif name and list(child.parameters(recurse=False)):
                for param, _ in list(child.named_parameters(recurse=False)):
                    self._bind(child, param, host.get(f"{prefix}.{name}.{param}"))
        return layer

    @property
    def shard_bytes(self) -> int:
        """Bytes of weights this rank holds under this layout (each distinct tensor counted once)."""
        seen: dict[int, int] = {}
        for _, _, tensor in self.host_params:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def to_device(self) -> int:
        """Put this layout's shards on the compute device; returns bytes copied (0 when computing on host)."""
        if self.device.type == "cpu":
            return 0
        copied: dict[int, torch.Tensor] = {}
        moved = 0
        for module, param, tensor in self.host_params:
            if id(tensor) not in copied:
                copied[id(tensor)] = tensor.to(self.device, non_blocking=True)
                moved += tensor.numel() * tensor.element_size()
            getattr(module, param).data = copied[id(tensor)]
        self.rotary.to(self.device)
        torch.cuda.synchronize(self.device)
        return moved

    def to_host(self) -> None:
        """Drop the device copies, pointing every parameter back at the host view."""
        if self.device.type == "cpu":
            return
        for module, param, tensor in self.host_params:
            getattr(module, param).data = tensor

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(token_ids)

    def run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, meta) -> torch.Tensor:
        position_embeddings = self.rotary(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids,
                           position_embeddings=position_embeddings, seesaw=meta)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()
