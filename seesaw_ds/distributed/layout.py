"""Parallel layouts as data: the pure rank math of (dp, tp, pp) and the validation of a layout pair.

A job's ranks are cut into *instances* of ``dp * tp * pp`` ranks; each instance runs the Seesaw loop on
its own share of the prompts and switches between its prefill and decode layouts. Inside an instance,
rank ``r`` has coordinates ``(dp_index, pp_index, tp_index)`` with TP varying fastest, so that a TP group
is made of neighbouring ranks (the ones most likely to share a node).

Nothing here touches processes or torch; every function is unit-tested on plain numbers.
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A layout that cannot run this model on this job; the message names the value and the fix."""


@dataclass(frozen=True)
class Layout:
    """A parallel layout of one instance: ``dp`` replicas, each ``pp`` pipeline stages of ``tp`` ranks."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def num_ranks(self) -> int:
        """Ranks one instance of this layout occupies."""
        return self.dp * self.tp * self.pp

    def coords(self, instance_rank: int) -> tuple[int, int, int]:
        """``(dp_index, pp_index, tp_index)`` of a rank inside its instance."""
        if not 0 <= instance_rank < self.num_ranks:
            raise IndexError(f"instance rank {instance_rank} outside a {self} instance")
        tp_index = instance_rank % self.tp
        pp_index = (instance_rank // self.tp) % self.pp
        dp_index = instance_rank // (self.tp * self.pp)
        return dp_index, pp_index, tp_index

    def instance_rank(self, dp_index: int, pp_index: int, tp_index: int) -> int:
        """Inverse of :meth:`coords`."""
        return (dp_index * self.pp + pp_index) * self.tp + tp_index

    def tp_groups(self) -> list[tuple[int, ...]]:
        """Instance ranks of every TP group (one per dp replica and pipeline stage)."""
        return [tuple(self.instance_rank(d, p, t) for t in range(self.tp))
                for d in range(self.dp) for p in range(self.pp)]

    def pp_groups(self) -> list[tuple[int, ...]]:
        """Instance ranks of every pipeline (one per dp replica and TP index), in stage order."""
        return [tuple(self.instance_rank(d, p, t) for p in range(self.pp))
                for d in range(self.dp) for t in range(self.tp)]

    def replica_ranks(self, dp_index: int) -> tuple[int, ...]:
        """Instance ranks of one data-parallel replica."""
        return tuple(range(dp_index * self.tp * self.pp, (dp_index + 1) * self.tp * self.pp))

    def __str__(self) -> str:
        parts = [f"{name}{value}" for name, value in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
                 if value > 1]
        return "·".join(parts) or "single"


@dataclass(frozen=True)
class ModelDims:
    """The model dimensions a layout is checked against and sharded by."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int


def layer_range(num_layers: int, pp: int, pp_index: int) -> range:
    """Decoder layers held by pipeline stage ``pp_index``: contiguous, the first stages one larger when
    ``num_layers`` does not divide evenly."""
    base, extra = divmod(num_layers, pp)
    start = pp_index * base + min(pp_index, extra)
    return range(start, start + base + (1 if pp_index < extra else 0))


def head_range(num_heads: int, tp: int, tp_index: int) -> range:
    """Attention (query) heads held by TP rank ``tp_index``; ``tp`` must divide ``num_heads``."""
    per_rank = num_heads // tp
    return range(tp_index * per_rank, (tp_index + 1) * per_rank)


def kv_head_range(num_kv_heads: int, tp: int, tp_index: int) -> range:
    """KV heads held by TP rank ``tp_index``. When ``tp`` exceeds the KV heads, each KV head is
    replicated on ``tp / num_kv_heads`` consecutive ranks (the ones whose query heads use it)."""
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return range(tp_index * per_rank, (tp_index + 1) * per_rank)
    replicas = tp // num_kv_heads
    head = tp_index // replicas
    return range(head, head + 1)


def validate_layout(name: str, layout: Layout, dims: ModelDims) -> None:
    """Raise :class:`LayoutError` when ``layout`` cannot shard a model of ``dims``."""
    for axis in ("dp", "tp", "pp"):
        value = getattr(layout, axis)
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"parallel.{name}.{axis}={value!r}: must be a positive integer")
    if dims.num_heads % layout.tp:
        valid = [t for t in range(1, dims.num_heads + 1) if dims.num_heads % t == 0]
        raise LayoutError(f"parallel.{name}.tp={layout.tp} does not divide the model's {dims.num_heads} "
                          f"attention heads; valid tp: {valid}")
    if layout.tp <= dims.num_kv_heads:
        if dims.num_kv_heads % layout.tp:
            valid = [t for t in range(1, dims.num_kv_heads + 1) if dims.num_kv_heads % t == 0]
            raise LayoutError(f"parallel.{name}.tp={layout.tp} does not divide the model's {dims.num_kv_heads} "
                              f"KV heads; use a divisor {valid} or a multiple of {dims.num_kv_heads} "
                              f"(KV heads are then replicated)")
    elif layout.tp % dims.num_kv_heads:
        raise LayoutError(f"parallel.{name}.tp={layout.tp} exceeds the model's {dims.num_kv_heads} KV heads "
                          f"and is not a multiple of them, so KV heads cannot be replicated evenly")
    if layout.pp > dims.num_layers:
        raise LayoutError(f"parallel.{name}.pp={layout.pp} exceeds the model's {dims.num_layers} layers; "
                          f"use pp <= {dims.num_layers}")


def validate_layouts(prefill: Layout, decode: Layout, dims: ModelDims, world_size: int) -> int:
    """Check a prefill/decode layout pair against the model and the job; return the number of instances.

    Both layouts must occupy the same ranks (an instance switches between them in place), and the
    instance size must divide the job's ranks.
    """
    return validate_named_layouts({"prefill": prefill, "decode": decode}, dims, world_size)


def validate_named_layouts(layouts: dict[str, Layout], dims: ModelDims, world_size: int) -> int:
    """Check every named layout against the model and that all of them fit the job the same way;
    returns the number of instances."""
    for name, layout in layouts.items():
        validate_layout(name, layout, dims)
    names = list(layouts)
    first = layouts[names[0]]
    for name in names[1:]:
        if layouts[name].num_ranks != first.num_ranks:
            raise LayoutError(
                f"parallel.{names[0]} ({first.num_ranks} ranks) and parallel.{name} ({layouts[name].num_ranks} "
                f"ranks) must use the same number of ranks: dp*tp*pp of every layout must be equal")
    if world_size % first.num_ranks:
        valid = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise LayoutError(
            f"dp*tp*pp={first.num_ranks} does not divide the job's {world_size} ranks "
            f"(launch.nproc or the Slurm allocation); use layouts of {valid} ranks or change the rank count")
    return world_size // first.num_ranks
