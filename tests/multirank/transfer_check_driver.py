"""One process, a gloo world of one rank, SEESAW_CHECK_HOST_TENSORS=1: every wrong route the transfer check
must refuse, and the right ones it must let through. Prints "REFUSED <case>" / "PASSED <case>" per case.

    python transfer_check_driver.py
"""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()), SEESAW_CHECK_HOST_TENSORS="1")
    from seesaw_ds.distributed.env import export_extension_dir

    export_extension_dir()  # DeepSpeed's shm all-reduce op: the venv's build, not a rebuild in ~/.cache
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    from seesaw_ds.backends import deepspeed as backend

    host_world = backend.new_host_group([0])
    area = torch.zeros(4, 8)
    backend.register_host_memory(area)  # as the staging area does
    cases = {
        # a staging-area piece (a host buffer) through the world's device group
        "host_buffer_through_device_isend": lambda: backend.isend(backend.host_empty((4,), torch.float32), 0),
        "host_buffer_through_device_recv": lambda: backend.recv(backend.host_empty((4,), torch.float32), 0),
        # a view of the registered area handed straight to torch.distributed on the default (device) group
        "area_view_through_device_send": lambda: torch.distributed.send(area[1], dst=0),
        "host_buffer_through_device_all_reduce": lambda: torch.distributed.all_reduce(backend.host_empty((4,), torch.float32)),
        # an activation through the host group
        "device_tensor_through_host_group": lambda: torch.distributed.all_reduce(
            torch.ones(4), group=host_world.process_group),
        # the host API given a device group
        "host_api_with_device_group": lambda: backend.host_isend(backend.host_empty((4,), torch.float32), 0, None),
    }
    for name, call in cases.items():
        try:
            call()
        except backend.HostTensorThroughDeviceGroup as error:
            print(f"REFUSED {name}: {error}", flush=True)
        else:
            print(f"PASSED {name}", flush=True)
    # the right routes go through (all-reduce over a world of one is the identity)
    activation = torch.ones(4)
    torch.distributed.all_reduce(activation)
    torch.distributed.all_reduce(backend.host_empty((4,), torch.float32).fill_(1), group=host_world.process_group)
    print(f"PASSED right_routes {activation.tolist()}", flush=True)


if __name__ == "__main__":
    main()
