"""One rank's slice of the model under one layout, built from transformers' own modules.

The model is instantiated once on the ``meta`` device (no memory) as a template. For a layout, this rank's
pipeline stage builds its decoder layers from the family's *local* config (this TP rank's heads and
intermediate sizes, :meth:`~seesaw_ds.model.families.ModelSpec.local_config`), on the meta device, and binds
every parameter to a view of the node-shared host copy: linears become AutoTP's
``LinearLayer``/``LinearAllreduce`` (a fused linear split per block becomes one per block, outputs
concatenated), experts shard their intermediate dimension and all-reduce their output, norms over all heads
all-reduce their sum of squares. The first stage gets the embedding, the last the final norm and ``lm_head``
(under TP split by vocabulary rows, the logits gathered on the rank that samples), with what the family's
forward does around the layers (embedding scale, logit scaling and soft-cap). Building a stage copies no
weight bytes, except the oneDNN-prepacked copies of a bf16 stage's linears on a CPU (``prepack``;
:func:`seesaw_ds.backends.deepspeed.pack_cpu_linears`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.distributed.groups import LayoutGroups
from seesaw_ds.distributed.layout import layer_range
from seesaw_ds.model import attention, kernels
from seesaw_ds.model.compiled import CompiledLayers
from seesaw_ds.model.families import ModelNotSupported, ModelSpec
from seesaw_ds.model.loader import HostWeights
from seesaw_ds.model.modules import (ScaledEmbedding, ShardedExperts, ShardedRMSNorm, SplitColumnLinear,
                                     VocabParallelHead, fuse_gated_mlps, fuse_rms_norms)
from seesaw_ds.model.rope import SequenceRope, fuse_rotary_apply
from seesaw_ds.model.shards import ShardKind, shard_dim, shard_ranges


def _run_layer(layer: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, position_embeddings) -> torch.Tensor:
    """One decoder layer (transformers' own); attention reads the batch from :func:`attention.batch`."""
    return layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class StageModel(nn.Module):
    """This rank's modules under one layout: embedding (first stage), layers, norm and head (last stage)."""

    def __init__(self, template: nn.Module, host: HostWeights, spec: ModelSpec, groups: LayoutGroups,
                 device: torch.device, *, prepack: bool = False, fuse_siblings: bool = False):
        super().__init__()
        self.spec = spec
        self.host = host
        self.groups = groups
        self.device = device
        self.tp = groups.layout.tp
        self.layer_ids = layer_range(spec.dims.num_layers, groups.layout.pp, groups.pp_index)
        self.host_params: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._weight_stream = None  # the stream weight copies run on (an accelerator only; made on first use)
        self.placements = 0
        """Times the weights were put on the device (each time in new tensors: a CUDA graph reads the latest)."""
        self.compiled: CompiledLayers | None = None  # the layers under torch.compile (compile())
        family, config = spec.family, template.config
        base = template.model
        self.embed = None
        if groups.is_first_stage:
            scale = None
            if family.embed_scale_sqrt_hidden:
                # sqrt(hidden) rounded to the weights' dtype, as transformers' Gemma does (its normalizer)
                scale = float(torch.tensor(config.hidden_size ** 0.5).to(host.dtype))
            elif family.embed_multiplier:
                scale = float(getattr(config, family.embed_multiplier))
            self.embed = ScaledEmbedding(scale)
            self._bind(self.embed, "weight", host.get("model.embed_tokens.weight"))
        local_config = spec.local_config(self.tp)
        local_config._attn_implementation = config._attn_implementation
        self.layers = nn.ModuleList(self._layer(type(base.layers[i]), local_config, i) for i in self.layer_ids)
        layer_types = getattr(config, "layer_types", None) if family.rope_per_layer_type else None
        self.layer_rope_types = [layer_types[i] for i in self.layer_ids] if layer_types else None
        if groups.is_last_stage:
            self.norm = self._replicated(copy.deepcopy(base.norm), "model.norm")
            self.lm_head = self._head(template.lm_head)
            self.logit_divisor = float(getattr(config, family.logit_divisor)) if family.logit_divisor else None
            cap = getattr(config, family.logit_softcap, None) if family.logit_softcap else None
            self.logit_softcap = float(cap) if cap else None
        else:
            self.norm = self.lm_head = None
        self.rope = SequenceRope(type(base.rotary_emb)(config=config), spec.length_dependent_rope)
        self._check_materialized()
        # bf16 on a CPU (model.cpu_prepack): oneDNN-prepacked weight copies beside the views. Built before the
        # device tier is sized, which on a CPU reads the memory still available, so their bytes are counted.
        # An eager stage (``fuse_siblings``) packs q/k/v and gate/up as one GEMM each. Inputs of one or two rows
        # (decode at batch 1-2) stream the views through the extension's few-row kernel where that is faster,
        # packed or not.
        # Where oneDNN has no bf16 path (backend.widens_bf16) the copies are float32, and the views widen at
        # every call rather than take torch's emulated bf16 GEMM.
        packable = backend.can_pack_cpu_linears(device, host.dtype)
        few_rows = kernels.few_row_linear() if packable else None
        if packable and (prepack or few_rows is not None or backend.widens_bf16()):
            backend.pack_cpu_linears(self, fuse_siblings=fuse_siblings, prepack=prepack, few_rows=few_rows)
        if torch.device(device).type == "cpu":
            fuse_rms_norms(self)  # transformers' Llama-recipe norms in one kernel call each
            fuse_gated_mlps(self)  # their MLPs' silu(gate) * up
            fuse_rotary_apply(self)  # and their rotary embedding's apply

    # ------------------------------------------------------------------ binding host views
    def _bind(self, module: nn.Module, param: str, tensor: torch.Tensor) -> None:
        setattr(module, param, nn.Parameter(tensor, requires_grad=False))
        self.host_params.append((module, param, tensor))

    def _replicated(self, module: nn.Module, prefix: str) -> nn.Module:
        for param, _ in list(module.named_parameters(recurse=False)):
            self._bind(module, param, self.host.get(f"{prefix}.{param}"))
        return module

    def _head(self, template_head: nn.Linear) -> nn.Module:
        """``lm_head``: whole on one TP rank; under TP split by vocabulary rows, the logits gathered on the
        TP group's first rank (:class:`~seesaw_ds.model.modules.VocabParallelHead`). Except on an accelerator
        when the head is the embedding (tied) and this rank holds the embedding too: there the whole head is
        the embedding's device copy, and a row shard would be a second copy of those rows."""
        weight = self.host.get("lm_head.weight")
        tied_here = self.embed is not None and weight is self.host.get("model.embed_tokens.weight")
        if self.tp == 1 or (tied_here and self.device.type != "cpu"):
            return self._replicated(copy.deepcopy(template_head), "lm_head")
        bias = self.host.get("lm_head.bias") if template_head.bias is not None else None
        vocab = weight.shape[0]
        chunk = -(-vocab // self.tp)
        start = min(vocab, self.groups.tp_index * chunk)
        rows = min(chunk, vocab - start)
        if rows < 1:
            raise ModelNotSupported(f"{self.spec.family.label}: a vocabulary of {vocab} rows does not split over "
                                    f"tp={self.tp}")
        linear = backend.replicated_linear(weight.narrow(0, start, rows),
                                           bias.narrow(0, start, rows) if bias is not None else None, "lm_head")
        return self._track(VocabParallelHead(linear, vocab, chunk, self.groups.tp_group, self.groups.tp_ranks))

    @property
    def head_gathers(self) -> bool:
        """Whether ``head`` is a collective over the TP group (every TP rank must call it alike)."""
        return isinstance(self.lm_head, VocabParallelHead)

    def _shards(self, name: str) -> list[torch.Tensor]:
        """This rank's pieces of host tensor ``name``: one view per block of its shard dimension."""
        tensor = self.host.get(name)
        dim = shard_dim(tensor.dim())
        ranges = shard_ranges(self.host.roles[name], tensor.shape[dim], self.spec.dims, self.tp,
                              self.groups.tp_index)
        return [tensor.narrow(dim, part.start, len(part)) for part in ranges]

    def _track(self, module: nn.Module) -> nn.Module:
        for param, tensor in module.named_parameters():
            owner = module.get_submodule(param.rpartition(".")[0]) if "." in param else module
            self.host_params.append((owner, param.rpartition(".")[2], tensor.data))
        return module

    def _linear(self, name: str, child: nn.Linear) -> nn.Module:
        role = self.host.roles[f"{name}.weight"]
        has_bias = child.bias is not None
        group = self.groups.tp_group
        if role.kind is ShardKind.ROW:
            (weight,) = self._shards(f"{name}.weight")  # [local in, out]
            bias = self.host.get(f"{name}.bias") if has_bias else None
            full = (weight.shape[1], weight.shape[0] * self.tp)
            return backend.row_linear(full, weight.t(), bias, group, name)
        if role.kind is ShardKind.REPLICATED:
            return backend.replicated_linear(self.host.get(f"{name}.weight"),
                                             self.host.get(f"{name}.bias") if has_bias else None, name)
        weights = self._shards(f"{name}.weight")
        biases = self._shards(f"{name}.bias") if has_bias else [None] * len(weights)
        parts = [backend.column_linear((w.shape[0] * self.tp, w.shape[1]), w, b, group, name)
                 for w, b in zip(weights, biases)]
        return parts[0] if len(parts) == 1 else SplitColumnLinear(parts)

    def _experts(self, name: str, child: nn.Module) -> nn.Module:
        gate_up, down = f"{name}.gate_up_proj", f"{name}.down_proj"
        if self.host.roles.get(gate_up, None) is None or self.host.roles[gate_up].kind is not ShardKind.COLUMN \
                or self.host.roles[down].kind is not ShardKind.ROW:
            raise ModelNotSupported(f"{name}: experts whose gate_up_proj/down_proj the TP plan does not shard")
        gate, up = self._shards(gate_up)
        (down_t,) = self._shards(down)
        group = self.groups.tp_group if self.tp > 1 else None
        return ShardedExperts(gate, up, down_t, child.act_fn, group)

    def _layer(self, layer_class: type, local_config, index: int) -> nn.Module:
        with torch.device("meta"):
            layer = layer_class(local_config, index)
        prefix = f"model.layers.{index}"
        replaced: list[str] = []
        for name, child in list(layer.named_modules()):
            if any(name.startswith(done + ".") for done in replaced):
                continue
            full = f"{prefix}.{name}"
            if name and self.spec.is_experts(full):
                new = self._track(self._experts(full, child))
            elif isinstance(child, nn.Linear):
                new = self._track(self._linear(full, child))
            elif name and self.spec.is_sharded_norm(full) and self.tp > 1:
                (weight,) = self._shards(f"{full}.weight")
                new = ShardedRMSNorm(weight, child.variance_epsilon, self.groups.tp_group, self.tp)
                self.host_params.append((new, "weight", weight))
            else:
                for param, _ in list(child.named_parameters(recurse=False)):
                    pieces = self._shards(f"{full}.{param}")
                    self._bind(child, param, pieces[0])
                continue
            _set_submodule(layer, name, new)
            replaced.append(name)
        return layer

    def _check_materialized(self) -> None:
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.is_meta:
                raise ModelNotSupported(f"{self.spec.family.label}: {name} has no weights in seesaw_ds's stage "
                                        f"(a module the family table does not describe)")

    # ------------------------------------------------------------------ device placement
    @property
    def shard_bytes(self) -> int:
        """Bytes of weights this rank holds under this layout (each distinct tensor counted once)."""
        seen: dict[tuple[int, int], int] = {}
        for _, _, tensor in self.host_params:
            seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def to_device(self) -> int:
        """Put this layout's shards on the compute device; returns bytes copied (0 when computing on host).

        The copies run on a stream of their own, straight from the pinned node-shared host copy; the compute
        stream is ordered after them on the device, and the host returns once they are done (a switch is
        timed: bytes over seconds against the host-to-device bandwidth)."""
        if self.device.type == "cpu":
            return 0
        self.placements += 1
        streams = backend.Streams(self.device)
        if self._weight_stream is None:
            self._weight_stream = streams.new_stream()
        compute = streams.current()
        copied: dict[int, torch.Tensor] = {}
        moved = 0
        with streams.use(self._weight_stream):
            for module, param, tensor in self.host_params:
                if id(tensor) not in copied:
                    copied[id(tensor)] = tensor.to(self.device, non_blocking=streams.enabled)
                    moved += tensor.numel() * tensor.element_size()
                getattr(module, param).data = copied[id(tensor)]
            done = streams.record(self._weight_stream)
        streams.wait(compute, done)
        for tensor in copied.values():
            streams.keep(tensor, compute)  # freed at the next switch: not reused before compute is done with it
        self.rope.to(self.device)
        streams.synchronize(done)
        return moved

    def to_host(self) -> None:
        """Drop the device copies, pointing every parameter back at the host view."""
        if self.device.type == "cpu":
            return
        for module, param, tensor in self.host_params:
            getattr(module, param).data = tensor

    # ------------------------------------------------------------------ forward pieces
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(token_ids)

    def run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, meta, segments: list[int],
                   max_position: int | None = None) -> torch.Tensor:
        """This stage's decoder layers; ``segments`` bounds each sequence's positions in ``position_ids``, the
        largest of which is ``max_position`` when the caller knows it; ``meta`` is the batch's attention
        metadata. Rotary embeddings are looked up here, eagerly, from position-indexed tables (computed per
        sequence where the rope type depends on the length); the layers run compiled when :meth:`compile` was
        called."""
        if self.layer_rope_types is None:
            shared = self.rope(hidden, position_ids, segments, max_position=max_position)
            embeddings = [shared] * len(self.layers)
        else:
            by_type = {t: self.rope(hidden, position_ids, segments, t, max_position=max_position)
                       for t in set(self.layer_rope_types)}
            embeddings = [by_type[t] for t in self.layer_rope_types]
        run = self.compiled or _run_layer
        with attention.batch(meta) as current:
            for index, layer, position_embeddings in zip(self.layer_ids, self.layers, embeddings):
                current.layer = index
                hidden = run(layer, hidden, position_ids, position_embeddings)
        return hidden

    def graph_refusal(self) -> str | None:
        """Why this stage's decode step cannot be one CUDA graph (seesaw_ds/model/graphs.py), or None."""
        if self.groups.layout.pp > 1:
            return "its hidden states cross pipeline stages point-to-point in the middle of a step"
        if self.rope.per_sequence:
            return "its rotary embedding depends on each sequence's length (computed per sequence on the host)"
        if any(isinstance(module, ShardedExperts) for module in self.modules()):
            return "its experts pick their tokens on the host (shapes that depend on the routing)"
        return None

    def compile(self) -> None:
        """Run the decoder layers under ``torch.compile`` from now on (:mod:`seesaw_ds.model.compiled`)."""
        if self.compiled is None:
            self.compiled = CompiledLayers(_run_layer)

    def head(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits of ``hidden``'s rows, in float32 (``float32=False``: in the model's dtype, for a caller that
        only takes their argmax)."""
        logits = self.lm_head(self.norm(hidden))
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float() if float32 else logits
