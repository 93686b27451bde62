"""AutoTP's layers over shards that already lie in memory, and their oneDNN-prepacked form on a CPU.

- ``column_linear`` / ``row_linear`` wrap a shard that already lies in memory (a view of the node-shared
  host copy) in AutoTP's ``LinearLayer`` / ``LinearAllreduce``: DeepSpeed decides the partition sizes and
  runs the forward and its all-reduce; we only supply the bytes, so nothing is copied.
- ``pack_cpu_linears``: on a CPU, a bfloat16 stage's linears (AutoTP's and plain ``nn.Linear``) get a
  oneDNN-prepacked copy of their weight and run through ``mkldnn._linear_pointwise`` (what inductor's
  freezing pass does): the same results bit for bit, without oneDNN re-laying the weight out on every call
  (measured 1.2-3.4x faster per call on the real model's decode shapes, docs/benchmarks.md). The copy costs
  the stage's weight bytes once more per layout; ``model.cpu_prepack=false`` keeps the views only.
  Where oneDNN has no bf16 path (an AVX2-only CPU: no AVX-512 BW/VL/DQ, no AVX-NE-CONVERT) torch falls back
  to an emulated bf16 GEMM (~6 GFLOP/s a core on the AMD EPYC without AVX-512, against ~35 in float32);
  there the copy is the weight widened to float32, and the linear widens its input and rounds its output to
  bf16 once: float32 sums of the same bf16 products rounded once, as oneDNN's bf16 path computes them,
  5-7x faster (:func:`widens_bf16`; twice the weight bytes once more). The views widen the weight at every
  call and then make the same call, so ``model.cpu_prepack=false`` gives the same bits there too.

The rest of the backend lies beside this module, one concern each: ``accelerator.py`` (the device, its
streams and events, the host-to-device probe), ``comm.py`` (start-up, device groups, the TP all-reduce,
point-to-point), ``routes.py`` (host tensors and the gloo twins they travel through, the transfer check).
backends/ is the only package that imports DeepSpeed, and it imports nothing of the project. The names
imported below are those modules' interface, kept here for the callers that use this module as ``backend``;
new code imports the module that owns a name.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from deepspeed.module_inject import layers as ds_layers

from seesaw_ds.backends.accelerator import (Streams, accelerator_name, device, device_count,  # noqa: F401
                                            host_to_device_GBps, mapped_view)
from seesaw_ds.backends.comm import (all_reduce, barrier, device_groups_capturable, gather_to_first,  # noqa: F401
                                     init_comm, isend, native_comm_backend, new_group, recv, shared_device_line,
                                     use_shm_allreduce)
from seesaw_ds.backends.routes import (HOST_TAG, HostGroup, HostTensorThroughDeviceGroup, TransferCheck,  # noqa: F401
                                       host_empty, host_isend, host_recv, mark_host, new_host_group,
                                       register_host_memory, unregister_host_memory)

log = logging.getLogger(__name__)


def _meta_linear(out_features: int, in_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


def _attach(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    expected = tuple(layer.weight.shape)
    if expected != tuple(weight.shape):
        raise AssertionError(f"AutoTP expects a {expected} shard, the host copy gives {tuple(weight.shape)}")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def column_linear(full_shape: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None, group,
                  name: str) -> nn.Module:
    """AutoTP's column-parallel ``LinearLayer`` holding the given output-dimension shard."""
    layer = ds_layers.LinearLayer(_meta_linear(*full_shape, bias is not None), mp_group=group, name=name)
    return _attach(layer, weight, bias)


def replicated_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
    """An unpartitioned ``LinearLayer`` (used for KV projections replicated across TP ranks)."""
    layer = ds_layers.LinearLayer(_meta_linear(*weight.shape, bias is not None), mp_group=None, name=name)
    return _attach(layer, weight, bias)


def row_linear(full_shape: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None, group,
               name: str) -> nn.Module:
    """AutoTP's row-parallel ``LinearAllreduce`` holding the given input-dimension shard."""
    layer = ds_layers.LinearAllreduce(_meta_linear(*full_shape, bias is not None), mp_group=group, name=name)
    return _attach(layer, weight, bias)


try:
    _LINEAR = torch.ops.mkldnn._linear_pointwise.default
    """oneDNN's linear over a prepacked weight, the overload resolved once (a call through
    ``torch.ops.mkldnn._linear_pointwise`` resolves it each time). Takes any leading dimensions and strides."""
except (AttributeError, RuntimeError):  # a torch without oneDNN: can_pack_cpu_linears is False there
    _LINEAR = None


def _onednn_lacks_bf16() -> bool:
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without oneDNN: nothing is packed (can_pack_cpu_linears)
        return False


_WIDENS_BF16 = _onednn_lacks_bf16()  # read once: a constant to torch.compile too


def widens_bf16() -> bool:
    """Whether this CPU's bf16 linears run on float32 copies of their weights: oneDNN has no bf16 path here
    (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT), so torch's own bf16 GEMM would be emulated."""
    return _WIDENS_BF16


def _prepacked(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """``weight``'s copy: oneDNN-prepacked bf16 where oneDNN multiplies bf16, else widened to float32 and left
    row-major (prepacking it measured within 7% on SmolLM2's shapes, and the views' calls then match)."""
    if widens_bf16():
        return _widened(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)


def _widened(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float32, row-major whatever its strides (a row shard lies transposed in the host copy)."""
    return weight.to(torch.float32, memory_format=torch.contiguous_format)


def _widened_linear(x: torch.Tensor, weight32: torch.Tensor) -> torch.Tensor:
    """``x @ weight32.T`` with ``x`` widened to float32, rounded once to ``x``'s dtype: MKL's GEMM at one or two
    rows (0.13 against oneDNN's 0.19-0.42 ms at SmolLM2's gate_proj), oneDNN above (7-43% faster at 64 rows,
    the head included). The one spelling for the float32 copies and the views alike."""
    x32 = x.float()
    if x.numel() <= 2 * x.shape[-1] or torch.compiler.is_compiling():  # (inductor lowers no bare oneDNN call)
        return nn.functional.linear(x32, weight32).to(x.dtype)
    return _LINEAR(x32, weight32, None, "none", [], "").to(x.dtype)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` over a oneDNN-prepacked ``W``, or over a float32 copy of a bf16 stage's weight
    (:func:`widens_bf16`): the one spelling of the call, eager and in the operator."""
    if packed.dtype != x.dtype:
        return _widened_linear(x, packed)
    return _LINEAR(x, packed, None, "none", [], "")


def _views_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` over an unpacked view (``model.cpu_prepack=false``): ``F.linear``, or where bf16 is
    widened (:func:`widens_bf16`) the float32 copies' call over the weight widened now (the emulated bf16
    GEMM is slower than widening at every call: 15 against 40 ms at 64 rows of SmolLM2's gate_proj)."""
    if x.dtype == torch.bfloat16 and widens_bf16():
        return _widened_linear(x, _widened(weight))
    return nn.functional.linear(x, weight)


@torch.library.custom_op("seesaw::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W.T`` over a oneDNN-prepacked ``W`` as one opaque operator: under ``torch.compile`` inductor
    lowers ``mkldnn._linear_pointwise`` only for weights it froze itself, so the compiled graph calls this."""
    return _packed_linear(x, packed)


@packed_linear_op.register_fake
def _packed_linear_shape(x, packed, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


class SiblingGroup:
    """Linears of one module that read the same input (attention's q/k/v, the MLP's gate/up) as one GEMM
    over their weights concatenated and prepacked once: the first member called with an input computes every
    member's output, the others take their slice of it. A member called with another input (or twice with
    one) computes the whole GEMM again, so the result never depends on the order of the calls. The slices are
    the separate GEMMs' bits (oneDNN reduces each output over K alike whatever N is;
    tests/unit/test_packed_linears.py), in fewer, larger calls: at one decode row the weights stream in one
    pass and the per-call cost is paid once (a one-row decode step of SmolLM2's 30 layers 38.4 -> 34.2 ms with the
    lean call below, ``launch/bench_decode.py``, docs/benchmarks.md)."""

    def __init__(self, packed: torch.Tensor, weights: list[torch.Tensor], few_rows=None):
        self.packed = packed
        self.weights = weights
        """The members' own weights (views of the host copy), which the few-row kernel reads."""
        self.sizes = [weight.shape[0] for weight in weights]
        self.few_rows = few_rows if all(weight.stride(-1) == 1 for weight in weights) else None
        """``(kernel, most rows)`` (:func:`pack_cpu_linears`) or None."""
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor | None] = []

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        outputs = self._outputs
        if x is not self._input or outputs[index] is None:
            kernel = _few_row_kernel(self.few_rows, x)
            whole = _packed_linear(x, self.packed) if kernel is None else kernel(x, self.weights)
            outputs = self._outputs = list(whole.split(self.sizes, -1))
            self._input = x
        out, outputs[index] = outputs[index], None
        if all(each is None for each in outputs):  # every member served: hold no activations between calls
            self._input = None
        return out


def _few_row_kernel(few_rows, x: torch.Tensor):
    """The few-row kernel of ``few_rows`` (``(kernel, most rows)`` or None) where it takes ``x``, else None."""
    if few_rows is None or x.dtype != torch.bfloat16 or not 0 < x.numel() <= few_rows[1] * x.shape[-1]:
        return None  # (an empty input, e.g. an expert no token chose, stays with oneDNN)
    return few_rows[0]


def _packed_matmul(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    group, packed = module.seesaw_group, module.seesaw_packed
    if torch.compiler.is_compiling():
        if group is not None:  # a fused stage compiled after all (stages that compile are built unfused)
            whole = packed_linear_op(x, group.packed, sum(group.sizes))
            return whole.split(group.sizes, -1)[module.seesaw_index]
        if packed is None:  # model.cpu_prepack=false: the views
            return _views_linear(x, module.weight)
        return packed_linear_op(x, packed, module.weight.shape[0])
    if group is not None:
        return group.output(module.seesaw_index, x)
    kernel = _few_row_kernel(module.seesaw_few_rows, x)
    if kernel is not None:
        return kernel(x, [module.weight])
    return _views_linear(x, module.weight) if packed is None else _packed_linear(x, packed)


class PackedLinearLayer(ds_layers.LinearLayer):
    """AutoTP's column-parallel linear over a prepacked weight (inference: its input all-reduce is the
    identity going forward, and the output is not gathered)."""

    def forward(self, input):
        output = _packed_matmul(self, input)
        return output if self.bias is None else ds_layers.add_bias(output, self.bias)


class PackedLinearAllreduce(ds_layers.LinearAllreduce):
    """AutoTP's row-parallel linear over a prepacked weight, its output all-reduced as DeepSpeed does."""

    def forward(self, input):
        output = ds_layers.RowParallel.apply(self.mp_group, _packed_matmul(self, input), True)
        return output if self.bias is None else ds_layers.add_bias(output, self.bias)


class PackedLinear(nn.Linear):
    """A replicated ``nn.Linear`` (the last stage's ``lm_head``) over a prepacked weight."""

    def forward(self, input):
        output = _packed_matmul(self, input)
        return output if self.bias is None else output + self.bias


_PACKED = ((PackedLinearLayer, ds_layers.LinearLayer), (PackedLinearAllreduce, ds_layers.LinearAllreduce),
           (PackedLinear, nn.Linear))


def can_pack_cpu_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_cpu_linears` applies: bfloat16 weights computed on a CPU with oneDNN (with a bf16
    path or without one: :func:`widens_bf16`)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Children of one module that the families' forwards call on the same input, in transformers' names."""


def _packable(module: nn.Module) -> type | None:
    """The packed class for ``module``, or None where it is not packed."""
    for packed_class, base in _PACKED:
        if type(module) is base and not getattr(module, "gather_output", False) \
                and module.weight.dtype == torch.bfloat16:
            return packed_class
    return None


def _pack(module: nn.Module, packed_class: type, packed: torch.Tensor | None, group: SiblingGroup | None = None,
          index: int = 0, few_rows=None) -> int:
    copy = packed if group is None else group.packed
    module.seesaw_packed, module.seesaw_group, module.seesaw_index = packed, group, index
    # the few-row kernel reads the weight row by row: a row-parallel shard, which lies transposed, stays with oneDNN
    module.seesaw_few_rows = few_rows if module.weight.stride(-1) == 1 else None
    module.__class__ = packed_class
    return 0 if copy is None else module.weight.numel() * copy.element_size()


def pack_cpu_linears(root: nn.Module, rows_hint: int = 64, *, fuse_siblings: bool = False, prepack: bool = True,
                     few_rows=None) -> int:
    """Give every linear under ``root`` a oneDNN-prepacked copy of its weight (laid out for about
    ``rows_hint`` input rows) and the forward that uses it; returns the bytes the copies take. The module's
    own weight stays the view of the host copy. With ``fuse_siblings`` the :data:`SIBLINGS` of a module share
    one packed copy of their weights concatenated (:class:`SiblingGroup`; the same bytes, eager forwards only:
    the group's bookkeeping is Python state a compiled graph would not replay).

    ``few_rows``, ``(kernel, most rows)``: eager inputs of at most that many rows go to ``kernel(x, weights)``
    (``x @ concat(weights).T`` over the weights' own row-major layout: the project's few-row kernel, measured
    faster than oneDNN at decode batches of one or two; backends/ imports nothing of the project, so the caller
    hands it over). With ``prepack`` false no copy is made: the linears run over their views (``F.linear``)
    except for the inputs ``few_rows`` takes. Call only when :func:`can_pack_cpu_linears`."""
    packed_bytes = 0
    for parent in list(root.modules()) if fuse_siblings and prepack else []:
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            classes = [_packable(member) if isinstance(member, nn.Module) else None for member in members]
            if None in classes or len({member.weight.shape[1] for member in members}) != 1:
                continue
            weights = [member.weight.detach() for member in members]
            group = SiblingGroup(_prepacked(torch.cat(weights), rows_hint), weights, few_rows)
            for index, (member, packed_class) in enumerate(zip(members, classes)):
                packed_bytes += _pack(member, packed_class, None, group, index)
    for module in list(root.modules()):
        packed_class = _packable(module)
        if packed_class is not None:
            packed = None
            if prepack:
                packed = _prepacked(module.weight.detach(), rows_hint)
            packed_bytes += _pack(module, packed_class, packed, few_rows=few_rows)
    return packed_bytes
