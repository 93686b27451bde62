"""The one place that imports DeepSpeed: communication start-up, the accelerator, and AutoTP's layers.

- ``init_comm`` starts ``deepspeed.comm`` (gloo on CPU, NCCL on CUDA) from the environment that
  :mod:`seesaw_ds.distributed.env` exported.
- ``column_linear`` / ``row_linear`` wrap a shard that already lies in memory (a view of the node-shared
  host copy) in AutoTP's ``LinearLayer`` / ``LinearAllreduce``: DeepSpeed decides the partition sizes and
  runs the forward and its all-reduce; we only supply the bytes, so nothing is copied.
- DeepSpeed's CPU shared-memory all-reduce ignores the process group and only works when the group is the
  whole world on one node; ``use_shm_allreduce`` switches it on only for a layout where that holds, and the
  process-group all-reduce (gloo) runs otherwise, e.g. across nodes.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import torch
from torch import nn

import deepspeed
import deepspeed.comm as ds_comm
from deepspeed.accelerator import get_accelerator
from deepspeed.module_inject import layers as ds_layers

from seesaw_ds.distributed import env as dist_env

log = logging.getLogger(__name__)


def accelerator_name() -> str:
    """``"cpu"`` or ``"cuda"`` (whatever DeepSpeed's accelerator abstraction picked)."""
    return get_accelerator().device_name()


def device() -> torch.device:
    """The device this rank computes on."""
    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())


def init_comm(timeout_s: float, local_rank: int) -> None:
    """Start deepspeed.comm over the exported RANK/WORLD_SIZE/MASTER_* variables (once per process)."""
    if ds_comm.is_initialized():
        return
    dist_env.export_extension_dir()
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank % max(1, accel.device_count()))
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    _unlink_shm_allreduce_files()


def _unlink_shm_allreduce_files() -> None:
    """DeepSpeed's CPU shm all-reduce never removes its /dev/shm buffer files (69 MB per rank per job);
    once every rank has mapped them (after a barrier), unlink this rank's: the mappings stay valid."""
    import glob
    import os

    if get_accelerator().device_name() != "cpu":
        return
    ds_comm.barrier()
    pattern = (f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_"
               f"{os.environ.get('MASTER_PORT')}_{os.environ.get('RANK')}")
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


def new_group(ranks: list[int]):
    """A process group over global ``ranks`` (collective over the world: every rank must call it)."""
    return ds_comm.new_group(ranks)


def use_shm_allreduce(enabled: bool) -> None:
    """Allow DeepSpeed's shared-memory all-reduce kernel (valid only for a world-sized group on one node)."""
    backend = ds_comm.comm.cdb
    if backend is None or getattr(backend, "shm_comm_op", None) is None:
        return
    if not hasattr(backend, "_seesaw_shm_level"):
        backend._seesaw_shm_level = getattr(backend, "shm_vector_kernel_level", 0)
    backend.shm_vector_kernel_level = backend._seesaw_shm_level if enabled else 0


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


def barrier(group=None) -> None:
    """A barrier over ``group`` (the world by default)."""
    ds_comm.barrier(group=group)


def recv(tensor: torch.Tensor, src: int) -> None:
    """Blocking point-to-point receive from global rank ``src``."""
    ds_comm.recv(tensor, src=src)


def isend(tensor: torch.Tensor, dst: int):
    """Non-blocking point-to-point send to global rank ``dst``; returns a handle with ``wait()``."""
    return ds_comm.isend(tensor, dst=dst)


def all_reduce(tensor: torch.Tensor, group) -> None:
    """Sum ``tensor`` in place over ``group`` (DeepSpeed's inference all-reduce: the shm kernel where valid)."""
    ds_comm.inference_all_reduce(tensor, group=group)
