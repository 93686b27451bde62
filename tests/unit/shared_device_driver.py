"""One rank of a two-rank gloo world whose device tensors cross it through host memory, as two ranks sharing
one GPU do (seesaw_ds/backends/comm.py): the CPU stands in for the device, so the copy out and back is
forced. Then the OR of flags over the host twin that a group's CUDA graphs decide by. Prints "OK <case>
<values>" per case.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python shared_device_driver.py
"""
from __future__ import annotations

import os

import torch


def main() -> None:
    from seesaw_ds.distributed.env import export_extension_dir

    export_extension_dir()
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    from seesaw_ds.backends import comm

    comm.init_comm(60.0, None, shared_device=True)
    comm._on_host = lambda tensor: True  # noqa: E731 - a CPU rank takes the path a shared GPU's ranks take
    rank = int(os.environ["RANK"])
    world = comm.new_group([0, 1])
    if rank == 0:
        sent = comm.isend(torch.arange(4, dtype=torch.float32) + 10, 1)
        sent.wait()
        got = torch.zeros(3, dtype=torch.bfloat16)
        comm.recv(got, 1)
        print(f"OK p2p {got.tolist()}", flush=True)
    else:
        got = torch.zeros(4)
        comm.recv(got, 0)
        print(f"OK p2p {got.tolist()}", flush=True)
        comm.isend(torch.full((3,), 2.5, dtype=torch.bfloat16), 0).wait()
    total = torch.full((5,), float(rank + 1))
    comm.all_reduce(total, world)
    print(f"OK all_reduce {total.tolist()}", flush=True)
    parts = comm.gather_to_first(torch.full((2,), float(rank)), world, (0, 1))
    print(f"OK gather {None if parts is None else [p.tolist() for p in parts]}", flush=True)
    from seesaw_ds.backends import routes
    flags = routes.host_any([rank == 0, False, rank == 1], routes.new_host_group([0, 1]))
    print(f"OK host_any {flags}", flush=True)  # what a tensor-parallel group's ranks agree (model/graphs.py)
    comm.barrier()


if __name__ == "__main__":
    main()
