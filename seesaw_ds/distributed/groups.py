"""Every communicator of both layouts, created once at start-up in the same order on every rank.

An *instance* is the ``dp*tp*pp`` ranks that switch between the prefill and decode layouts together;
its MPI communicator carries the control messages (one step plan per step, broadcast from the instance's
rank 0). For each layout, :class:`LayoutGroups` tells this rank its coordinates, its TP process group
(deduplicated across layouts: tp2 under both layouts is one group) and its pipeline neighbours.

Every device process group (NCCL on GPUs; the world group, every TP group) has a CPU twin over the same
ranks (gloo, :class:`~seesaw_ds.backends.deepspeed.HostGroup`), created with it: host tensors (KV pieces
of the staging area that cross nodes, host-side control data) go through the twin, device tensors
(activations, TP all-reduces, pipeline hidden states) through the device group. Step plans travel over the
instance's MPI communicator, which is host-side already.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mpi4py import MPI

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.distributed.env import DistEnv, node_cpus
from seesaw_ds.distributed.layout import Layout


@dataclass
class LayoutGroups:
    """This rank's place in one layout, with global ranks and the process groups it uses."""

    layout: Layout
    dp_index: int
    pp_index: int
    tp_index: int
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    tp_group: object | None
    shm_allreduce: bool
    tp_host_group: backend.HostGroup | None = None  # the TP group's CPU twin

    @property
    def is_first_stage(self) -> bool:
        return self.pp_index == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_index == self.layout.pp - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first_stage else self.pp_ranks[self.pp_index - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last_stage else self.pp_ranks[self.pp_index + 1]


@dataclass
class Topology:
    """The job as this rank sees it: its instance, the instance's communicator and both layouts' groups."""

    env: DistEnv
    instance_index: int
    num_instances: int
    instance_ranks: tuple[int, ...]
    instance_comm: MPI.Comm
    layouts: dict[str, LayoutGroups] = field(default_factory=dict)
    node_of_rank: tuple[int, ...] = ()
    host_world: backend.HostGroup | None = None  # the world group's CPU twin: KV pieces between nodes

    @property
    def instance_rank(self) -> int:
        return self.instance_comm.Get_rank()

    @property
    def is_leader(self) -> bool:
        """The instance's rank 0: it runs the scheduler and broadcasts step plans."""
        return self.instance_rank == 0

    def instance_to_global(self, instance_rank: int) -> int:
        return self.instance_ranks[instance_rank]


def build_topology(env: DistEnv, layouts: dict[str, Layout]) -> Topology:
    """Create the instance communicator and every TP group of every layout, each with its CPU twin
    (collective over the world)."""
    sizes = {layout.num_ranks for layout in layouts.values()}
    if len(sizes) != 1:
        raise ValueError(f"all layouts must use the same number of ranks, got {layouts}")
    instance_size = sizes.pop()
    instance_index = env.rank // instance_size
    instance_ranks = tuple(range(instance_index * instance_size, (instance_index + 1) * instance_size))
    instance_comm = env.world.Split(color=instance_index, key=env.rank)
    node_of_rank = tuple(env.world.allgather(env.info.node_index))
    single_node_world = len(set(node_of_rank)) == 1
    # DeepSpeed's shared-memory all-reduce spins while it waits: only where every rank has a CPU of its own
    one_cpu_each = all(env.world.allgather(env.info.host_local_size <= node_cpus()))

    created: dict[tuple[int, ...], object] = {}
    twins: dict[tuple[int, ...], backend.HostGroup] = {}
    topology = Topology(env=env, instance_index=instance_index, num_instances=env.world_size // instance_size,
                        instance_ranks=instance_ranks, instance_comm=instance_comm, node_of_rank=node_of_rank,
                        host_world=backend.new_host_group(list(range(env.world_size))))
    local = env.rank - instance_index * instance_size
    for name, layout in layouts.items():
        # Every rank walks every instance's groups in the same order: new_group is collective.
        for instance in range(env.world_size // instance_size):
            base = instance * instance_size
            for group in layout.tp_groups():
                ranks = tuple(base + r for r in group)
                if len(ranks) > 1 and ranks not in created:
                    created[ranks] = backend.new_group(list(ranks))
                    twins[ranks] = backend.new_host_group(list(ranks))
        dp_index, pp_index, tp_index = layout.coords(local)
        tp_ranks = tuple(instance_ranks[layout.instance_rank(dp_index, pp_index, t)] for t in range(layout.tp))
        pp_ranks = tuple(instance_ranks[layout.instance_rank(dp_index, p, tp_index)] for p in range(layout.pp))
        topology.layouts[name] = LayoutGroups(
            layout=layout, dp_index=dp_index, pp_index=pp_index, tp_index=tp_index, tp_ranks=tp_ranks,
            pp_ranks=pp_ranks, tp_group=created.get(tp_ranks), tp_host_group=twins.get(tp_ranks),
            shm_allreduce=single_node_world and one_cpu_each and len(tp_ranks) == env.world_size
            and env.world_size > 1)
    return topology
