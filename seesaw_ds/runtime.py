"""Start-up of one rank: from settings to a ready executor (discovery, validation, groups, weights).

Everything that can be checked before work is checked here, on every rank identically, so that a bad
layout or model directory stops the whole job with one message and no rank left waiting.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.backends.accelerator import device_identity
from seesaw_ds.cpu_dtype import bf16_warning
from seesaw_ds.distributed import env as dist_env
from seesaw_ds.distributed.groups import Topology, build_topology
from seesaw_ds.distributed.layout import Layout
from seesaw_ds.kv.sizing import max_replica_tokens
from seesaw_ds.model.executor import Executor
from seesaw_ds.model.loader import Checkpoint, HostWeights, open_checkpoint, parse_dtype, plan_host_tensors
from seesaw_ds.model.template import build_template, parameter_shapes, validate_model_layouts

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a rank holds once started: its topology, the checkpoint, the host weights and the executor."""

    topology: Topology
    checkpoint: Checkpoint
    host: HostWeights
    executor: Executor
    layouts: dict[str, Layout]

    def close(self) -> None:
        """Release the node-shared memory: the staging area's and the host weights' (collective over the
        node). Every MPI window is freed before MPI_Finalize: MPICH's OFI netmod fails its finalize on a
        window still open ("fabricclose ... Device or resource busy")."""
        if self.executor.staging is not None:
            self.executor.staging.close()
        self.topology.env.node.Barrier()
        self.host.free()


def start(model_path: str, layouts: dict[str, Layout], *, device_tokens: int | None = None, block_size: int = 16,
          ranks_per_node: int | None = None, dtype: str | None = None, trust_remote_code: bool = False, comm_timeout_s: float = 600.0, staging_factory=None,
          prefill_micro_batches: int = 8, device_memory_fraction: float | None = None,
          max_model_len: int | None = None, max_decode_seqs: int | None = None,
          master_addr: str | None = None, cpu_prepack: bool = True, compile: str | bool = "auto",
          cuda_graphs: str | bool = "auto") -> Runtime:
    """Start this rank (collective over MPI.COMM_WORLD). Raises ValueError subclasses on bad settings.

    ``layouts`` names every layout the executor can switch to (a job has "prefill" and "decode").
    ``device_tokens`` None sizes the device tier from memory (seesaw_ds/kv/sizing.py), at most
    ``max_decode_seqs`` sequences of ``max_model_len`` (default: the model's) tokens per replica.
    """
    env = dist_env.discover(ranks_per_node)
    torch.set_num_threads(dist_env.cores_per_rank(env.info.host_local_size))
    crowded = dist_env.oversubscription_warning(env.info.host_local_size, dist_env.node_cpus())
    if crowded and env.info.host_local_rank == 0:
        log.warning("%s", crowded)
    checkpoint = open_checkpoint(model_path, trust_remote_code=trust_remote_code)
    validate_model_layouts(checkpoint, layouts, env.world_size)
    dist_env.export_torch_env(env, master_addr)
    dist_env.export_extension_dir()  # DeepSpeed's CPU shm all-reduce builds into this venv
    device_index, shared_device = None, False
    if backend.accelerator_name() != "cpu":
        devices = backend.device_count()
        device_index = dist_env.device_index(env.info.host_local_rank, devices)
        dist_env.export_device_rank(device_index)  # DeepSpeed binds its process group to LOCAL_RANK's device
        mine = (env.info.hostname, device_identity(device_index))
        env.ranks_per_device, sharers = dist_env.sharing(env.world.allgather(mine), mine)
        shared_device = sharers is not None  # every rank decides alike: NCCL takes one rank a device
        if shared_device and env.rank == 0:
            log.warning("%s", backend.shared_device_line(*sharers, backend.native_comm_backend()))
    backend.init_comm(comm_timeout_s, device_index, shared_device)
    topology = build_topology(env, layouts)
    template = build_template(checkpoint.config)
    plan = plan_host_tensors(checkpoint, parameter_shapes(template))
    host = HostWeights(checkpoint, plan, env.node, parse_dtype(dtype, checkpoint.config_dtype),
                       pin=backend.accelerator_name() != "cpu")
    if env.rank == 0 and backend.accelerator_name() == "cpu":
        # None unless bf16 on a CPU without native bf16
        warning = bf16_warning(str(host.dtype), widened=backend.widens_bf16())
        if warning:
            log.warning("%s", warning)
    staging = staging_factory(topology, checkpoint.dims, host.dtype) if staging_factory else None
    max_len = max_model_len or getattr(checkpoint.config, "max_position_embeddings", None)
    executor = Executor(topology, host, template, checkpoint.spec, device_tokens=device_tokens,
                        block_size=block_size, staging=staging, prefill_micro_batches=prefill_micro_batches,
                        device_memory_fraction=device_memory_fraction,
                        device_tokens_cap=max_replica_tokens(max_len, max_decode_seqs), prepack=cpu_prepack,
                        compile=compile, max_decode_seqs=max_decode_seqs, max_model_len=max_len,
                        cuda_graphs=cuda_graphs)
    return Runtime(topology=topology, checkpoint=checkpoint, host=host, executor=executor, layouts=layouts)
