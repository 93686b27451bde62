"""Hugging Face checkpoint directories: validation, and the node-shared host copy of the weights.

``open_checkpoint`` checks a directory before any work (config, safetensors, no pickle unless allowed)
and reads only metadata. ``HostWeights`` then loads the tensors once per node into memory every rank of
the node maps (:class:`~seesaw_ds.distributed.hostmem.NodeSharedBuffer`), in the host layout of
:mod:`seesaw_ds.model.shards`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from mpi4py import MPI
from safetensors import safe_open

from seesaw_ds.distributed.hostmem import NodeSharedBuffer, align
from seesaw_ds.distributed.layout import ModelDims
from seesaw_ds.model.shards import ShardKind, classify, host_shape

log = logging.getLogger(__name__)

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_NAMED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A model directory that cannot be served; the message names the path and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor: its file, shape and stored dtype."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """Metadata of a checkpoint directory (no tensor data read yet)."""

    path: Path
    config: object
    dims: ModelDims
    tensors: dict[str, TensorInfo]

    @property
    def tied_embeddings(self) -> bool:
        return "lm_head.weight" not in self.tensors


def parse_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    """``model.dtype`` config value to a torch dtype (None or "auto" keeps ``default``)."""
    if name in (None, "auto"):
        return default
    if name not in _NAMED_DTYPES:
        raise CheckpointError(f"model.dtype={name!r} is not supported; use one of auto, {', '.join(_NAMED_DTYPES)}")
    return _NAMED_DTYPES[name]


def model_dims(config) -> ModelDims:
    """The dimensions seesaw_ds shards by, from a transformers config."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return ModelDims(num_layers=config.num_hidden_layers, num_heads=num_heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
                     head_dim=head_dim, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, vocab_size=config.vocab_size)


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Checkpoint:
    """Validate a Hugging Face checkpoint directory and read its metadata."""
    from transformers import AutoConfig

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"model.path={str(path)!r} is not a directory; point model.path at a Hugging Face "
                              f"checkpoint directory (config.json + *.safetensors)")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"model.path={str(path)!r} has no config.json; it must be a Hugging Face "
                              f"checkpoint directory")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled and not allow_pickle:
            raise CheckpointError(
                f"model.path={str(path)!r} holds only pickle weights ({', '.join(pickled[:3])}); pickle can run "
                f"arbitrary code, so seesaw_ds reads safetensors: convert the checkpoint to safetensors, or set "
                f"model.allow_pickle=true if you trust it")
        if not pickled:
            raise CheckpointError(f"model.path={str(path)!r} has no *.safetensors weights")
        raise CheckpointError(f"model.path={str(path)!r}: model.allow_pickle=true is set but loading pickle "
                              f"checkpoints is not supported yet; convert it to safetensors")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise CheckpointError(f"model.path={str(path)!r}: {error} (set model.trust_remote_code=true only if you "
                              f"trust the checkpoint's code)") from None
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                meta = handle.get_slice(name)
                dtype = _DTYPES.get(meta.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file.name}:{name} has dtype {meta.get_dtype()}, which seesaw_ds "
                                          f"cannot serve (floating point checkpoints only)")
                tensors[name] = TensorInfo(file=file, shape=tuple(meta.get_shape()), dtype=dtype)
    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"model.path={str(path)!r} is not a standard decoder checkpoint "
                              f"(no model.embed_tokens.weight); Llama, Mistral and Qwen2 layouts are supported")
    return Checkpoint(path=directory, config=config, dims=model_dims(config), tensors=tensors)


class HostWeights:
    """The whole model once per node in shared host memory, in the host layout (collective over the node).

    ``get(name)`` returns the host tensor (row-parallel weights transposed); ``lm_head.weight`` falls back to
    the embedding when embeddings are tied.
    """

    def __init__(self, checkpoint: Checkpoint, node_comm: MPI.Comm, row_parallel: frozenset[str],
                 dtype: torch.dtype, *, pin: bool = False):
        self.dtype = dtype
        self.roles = {name: classify(name, row_parallel) for name in checkpoint.tensors}
        offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        cursor = 0
        element = torch.empty((), dtype=dtype).element_size()
        for name, info in checkpoint.tensors.items():
            shape = host_shape(info.shape, self.roles[name].kind)
            offsets[name] = (cursor, shape)
            cursor += align(element * _numel(shape))
        self.nbytes = cursor
        self._buffer = NodeSharedBuffer(node_comm, cursor, pin=pin)
        self._views = {name: self._buffer.view(offset, shape, dtype) for name, (offset, shape) in offsets.items()}
        if node_comm.Get_rank() == 0:
            self._fill(checkpoint)
        node_comm.Barrier()
        if checkpoint.tied_embeddings:
            self._views["lm_head.weight"] = self._views["model.embed_tokens.weight"]

    def _fill(self, checkpoint: Checkpoint) -> None:
        """Read every tensor's bytes from its file straight into shared memory (no private heap copy, which
        the allocator would keep); transposes and dtype casts go through a small bounded scratch buffer."""
        by_file: dict[Path, list[str]] = {}
        for name, info in checkpoint.tensors.items():
            by_file.setdefault(info.file, []).append(name)
        for file, names in by_file.items():
            offsets, data_start = _safetensors_offsets(file)
            with open(file, "rb", buffering=0) as handle:
                for name in names:
                    begin, end = offsets[name]
                    info = checkpoint.tensors[name]
                    self._read_tensor(handle, data_start + begin, end - begin, info,
                                      self.roles[name].kind is ShardKind.ROW, self._views[name])

    def _read_tensor(self, handle, offset: int, nbytes: int, info: TensorInfo, transpose: bool,
                     target: torch.Tensor) -> None:
        if not transpose and info.dtype == target.dtype:
            view = memoryview(target.view(-1).view(torch.uint8).numpy())
            handle.seek(offset)
            while view.nbytes:
                count = handle.readinto(view)
                if not count:
                    raise CheckpointError(f"{info.file} ends inside a tensor: the file is truncated")
                view = view[count:]
            return
        rows = info.shape[0] if info.shape else 1
        row_bytes = nbytes // max(1, rows)
        step = max(1, (_SCRATCH_BYTES // max(1, row_bytes)))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            handle.seek(offset + start * row_bytes)
            chunk = torch.frombuffer(bytearray(handle.read((stop - start) * row_bytes)), dtype=info.dtype)
            chunk = chunk.view(stop - start, *info.shape[1:])
            if transpose:
                target[:, start:stop] = chunk.t()
            else:
                target.view(rows, -1)[start:stop] = chunk.view(stop - start, -1)

    def get(self, name: str) -> torch.Tensor:
        return self._views[name]

    def names(self) -> list[str]:
        return list(self._views)

    def free(self) -> None:
        """Release the shared memory (collective over the node)."""
        self._views = {}
        self._buffer.free()


_SCRATCH_BYTES = 8 << 20


def _safetensors_offsets(file: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Each tensor's byte range within the data section, and where the data section starts."""
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return {name: tuple(entry["data_offsets"]) for name, entry in header.items()}, 8 + header_len


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def read_generation_defaults(path: Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (empty when absent)."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    return json.loads(file.read_text())
