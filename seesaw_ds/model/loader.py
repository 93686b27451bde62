"""Hugging Face checkpoint directories: validation, the host layout, and the node-shared host copy.

``open_checkpoint`` checks a directory before any work and reads only metadata: config, the family that
serves it (:mod:`seesaw_ds.model.families`; anything else is refused here), the safetensors files (those
``model.safetensors.index.json`` names when it exists, a stray ``consolidated.safetensors`` ignored, a tensor
in two files an error). ``plan_host_tensors`` maps the checkpoint's tensors onto the model's parameters
(transformers-5 names; per-expert tensors of older MoE checkpoints fill their slot of the fused expert
tensors) and checks every name and shape, still before any weight is read. ``HostWeights`` then loads the
tensors once per node into memory every rank of the node maps
(:class:`~seesaw_ds.distributed.hostmem.NodeSharedBuffer`), in the host layout of :mod:`seesaw_ds.model.shards`.
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
from seesaw_ds.distributed.waits import settle
from seesaw_ds.model.families import ModelSpec, legacy_target, model_dims, model_spec
from seesaw_ds.model.shards import TensorRole, host_shape

log = logging.getLogger(__name__)

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_NAMED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_FILE = "model.safetensors.index.json"


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
    tensors: dict[str, TensorInfo]
    spec: ModelSpec

    @property
    def dims(self) -> ModelDims:
        return self.spec.dims

    @property
    def tied_embeddings(self) -> bool:
        return "lm_head.weight" not in self.tensors

    @property
    def config_dtype(self) -> torch.dtype:
        """The dtype the config declares (``dtype``/``torch_dtype``), else the stored one."""
        declared = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = _NAMED_DTYPES.get(declared)
        if isinstance(declared, torch.dtype) and declared in _NAMED_DTYPES.values():
            return declared
        return next(iter(self.tensors.values())).dtype


def parse_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    """``model.dtype`` config value to a torch dtype (None or "auto" keeps ``default``: the config's dtype)."""
    if name in (None, "auto"):
        return default
    if name not in _NAMED_DTYPES:
        raise CheckpointError(f"model.dtype={name!r} is not supported; use one of auto, {', '.join(_NAMED_DTYPES)}")
    return _NAMED_DTYPES[name]


def _weight_files(directory: Path, path) -> list[Path]:
    """The safetensors files holding the model: those the index names, else every one but a stray
    ``consolidated*.safetensors`` (Mistral's native format, kept beside the Hugging Face files)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"model.path={str(path)!r}: {INDEX_FILE} has no weight_map; fix or remove it") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"model.path={str(path)!r}: {INDEX_FILE} names missing files "
                                  f"({', '.join(missing[:3])}); the download is incomplete")
        return files
    files = sorted(directory.glob("*.safetensors"))
    standard = [f for f in files if not f.name.startswith("consolidated")]
    if files and not standard:
        raise CheckpointError(f"model.path={str(path)!r} holds only {files[0].name} (Mistral's native format); "
                              f"use the Hugging Face format files (model*.safetensors + config.json)")
    return standard


def open_checkpoint(path: str | Path, *, trust_remote_code: bool = False) -> Checkpoint:
    """Validate a Hugging Face checkpoint directory and read its metadata (no tensor data)."""
    from transformers import AutoConfig

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"model.path={str(path)!r} is not a directory; point model.path at a Hugging Face "
                              f"checkpoint directory (config.json + *.safetensors)")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"model.path={str(path)!r} has no config.json; it must be a Hugging Face "
                              f"checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"model.path={str(path)!r}: {str(error).splitlines()[0]} (set model.trust_remote_code"
                              f"=true only if you trust the checkpoint's code)") from None
    spec = model_spec(config, where=f"model.path={str(path)!r}")
    files = _weight_files(directory, path)
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise CheckpointError(
                f"model.path={str(path)!r} holds only pickle weights ({', '.join(pickled[:3])}); seesaw_ds reads "
                f"safetensors (pickle can run arbitrary code): convert it, e.g. with transformers' "
                f"save_pretrained(safe_serialization=True)")
        raise CheckpointError(f"model.path={str(path)!r} has no *.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                meta = handle.get_slice(name)
                dtype = _DTYPES.get(meta.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file.name}:{name} has dtype {meta.get_dtype()}, which seesaw_ds "
                                          f"cannot serve (floating point checkpoints only)")
                if name in tensors:
                    raise CheckpointError(f"model.path={str(path)!r}: tensor {name} is in both "
                                          f"{tensors[name].file.name} and {file.name}; remove the stray file")
                tensors[name] = TensorInfo(file=file, shape=tuple(meta.get_shape()), dtype=dtype)
    return Checkpoint(path=directory, config=config, tensors=tensors, spec=spec)


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor and where it goes in a host tensor: whole, or one expert / block of it."""

    name: str
    expert: int | None = None
    block: int | None = None


@dataclass(frozen=True)
class HostTensor:
    """A model parameter in the host copy: its checkpoint-orientation shape, role and sources."""

    shape: tuple[int, ...]
    role: TensorRole
    sources: tuple[Source, ...]


def plan_host_tensors(checkpoint: Checkpoint, parameters: dict[str, tuple[int, ...]]) -> dict[str, HostTensor]:
    """Map the checkpoint's tensors onto the model's ``parameters`` (name -> shape, transformers 5 names),
    checking every name and shape before any weight is read (CheckpointError)."""
    spec = checkpoint.spec
    sources: dict[str, list[Source]] = {}
    ignored = []
    for name in checkpoint.tensors:
        if name in parameters:
            sources.setdefault(name, []).append(Source(name))
            continue
        legacy = legacy_target(name, spec.family)
        if legacy and legacy[0] in parameters:
            target, expert, block = legacy
            sources.setdefault(target, []).append(Source(name, expert, block))
        else:
            ignored.append(name)
    if ignored:
        log.info("checkpoint tensors not used by the model: %s", ", ".join(ignored[:5]))
    tied = checkpoint.tied_embeddings and "lm_head.weight" in parameters
    wanted = [n for n in parameters if not (tied and n == "lm_head.weight")]
    missing = [n for n in wanted if n not in sources]
    where = f"model.path={str(checkpoint.path)!r}"
    if missing:
        raise CheckpointError(f"{where}: the checkpoint lacks {missing[0]}" +
                              (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "") +
                              f"; it does not match its config.json ({spec.family.label})")
    plan = {}
    for name in wanted:
        shape = parameters[name]
        for source in sources[name]:
            got = checkpoint.tensors[source.name].shape
            want = _source_shape(shape, source)
            if tuple(got) != tuple(want):
                raise CheckpointError(f"{where}: tensor {source.name} has shape {tuple(got)}, the config says "
                                      f"{tuple(want)}; the checkpoint does not match its config.json")
        if len(sources[name]) > 1 or sources[name][0].expert is not None:
            _check_complete(name, shape, sources[name], where)
        plan[name] = HostTensor(shape=tuple(shape), role=spec.role(name, tuple(shape)), sources=tuple(sources[name]))
    return plan


def _source_shape(shape: tuple[int, ...], source: Source) -> tuple[int, ...]:
    if source.expert is None:
        return tuple(shape)
    inner = shape[1:]
    if source.block is None:
        return tuple(inner)
    return (inner[0] // 2, *inner[1:])


def _check_complete(name: str, shape: tuple[int, ...], sources: list[Source], where: str) -> None:
    expected = {(e, b) for e in range(shape[0]) for b in ((0, 1) if sources[0].block is not None else (None,))}
    got = {(s.expert, s.block) for s in sources}
    if got != expected:
        raise CheckpointError(f"{where}: the per-expert tensors of {name} are incomplete "
                              f"({len(got)} of {len(expected)} present)")


class HostWeights:
    """The whole model once per node in shared host memory, in the host layout (collective over the node).

    ``get(name)`` returns the host tensor (row-parallel tensors with their last two dimensions swapped) and
    ``roles[name]`` how it shards; ``lm_head.weight`` falls back to the embedding when embeddings are tied.
    """

    def __init__(self, checkpoint: Checkpoint, plan: dict[str, HostTensor], node_comm: MPI.Comm,
                 dtype: torch.dtype, *, pin: bool = False):
        self.dtype = dtype
        self.roles = {name: tensor.role for name, tensor in plan.items()}
        offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        cursor = 0
        element = torch.empty((), dtype=dtype).element_size()
        for name, tensor in plan.items():
            shape = host_shape(tensor.shape, tensor.role)
            offsets[name] = (cursor, shape)
            cursor += align(element * _numel(shape))
        self.nbytes = cursor
        self._buffer = NodeSharedBuffer(node_comm, cursor, pin=pin)
        self._views = {name: self._buffer.view(offset, shape, dtype) for name, (offset, shape) in offsets.items()}
        if node_comm.Get_rank() == 0:
            self._fill(checkpoint, plan)
        settle(node_comm)  # the node's rank 0 reads the weights meanwhile
        node_comm.Barrier()
        if "lm_head.weight" not in self._views:
            self._views["lm_head.weight"] = self._views["model.embed_tokens.weight"]
            self.roles["lm_head.weight"] = self.roles["model.embed_tokens.weight"]

    def _fill(self, checkpoint: Checkpoint, plan: dict[str, HostTensor]) -> None:
        """Read every tensor's bytes from its file straight into shared memory (no private heap copy, which
        the allocator would keep); transposes and dtype casts go through a small bounded scratch buffer."""
        by_file: dict[Path, list[tuple[str, Source]]] = {}
        for name, tensor in plan.items():
            for source in tensor.sources:
                by_file.setdefault(checkpoint.tensors[source.name].file, []).append((name, source))
        for file, entries in by_file.items():
            offsets, data_start = _safetensors_offsets(file)
            with open(file, "rb", buffering=0) as handle:
                for name, source in entries:
                    begin, end = offsets[source.name]
                    info = checkpoint.tensors[source.name]
                    target = self._views[name]
                    if source.expert is not None:
                        target = target[source.expert]
                    if source.block is not None:  # one half of a packed [gate | up] expert matrix
                        half = target.shape[0] // 2
                        target = target[source.block * half:(source.block + 1) * half]
                    self._read_tensor(handle, data_start + begin, end - begin, info, plan[name].role.transposed, target)

    def _read_tensor(self, handle, offset: int, nbytes: int, info: TensorInfo, transpose: bool,
                     target: torch.Tensor) -> None:
        if not transpose and info.dtype == target.dtype and target.is_contiguous():
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
            if transpose and chunk.dim() == 2:  # [out rows, in] into the swapped [in, out]
                target[:, start:stop] = chunk.t()
            elif transpose:  # stacked experts [experts, out, in] into [experts, in, out]
                target[start:stop] = chunk.transpose(-1, -2)
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
