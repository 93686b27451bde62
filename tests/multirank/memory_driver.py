"""Measures what loading the model costs each rank in host memory (run under mpiexec by test_memory.py).

Prints one JSON line on rank 0: the weights' bytes, and per rank the growth of its unique (USS) and
proportional (PSS) memory from before start-up to after a forward pass under each layout, and the mapping of
the node-shared weight window itself. One host copy per node means the window's PSS adds up to one copy
over the ranks, and no rank's unique memory outside the window grows by anything like a copy. (USS alone
misleads: window pages touched by one rank only are reported as that rank's "private" pages.)
"""
from __future__ import annotations

import gc
import json
import sys

import psutil
from mpi4py import MPI

from seesaw_ds import runtime as runtime_mod
from seesaw_ds.distributed.layout import Layout
from seesaw_ds.model.executor import ForwardPlan, SeqWork


def memory() -> tuple[int, int]:
    info = psutil.Process().memory_full_info()
    return info.uss, info.pss


def mapping_of(address: int) -> dict[str, int]:
    """Rss/Pss/Private of the memory mapping holding ``address`` (kB -> bytes), from /proc/self/smaps."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = start <= address < end
            elif inside and head.rstrip(":") in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                fields[head.rstrip(":")] = int(line.split()[1]) * 1024
    return fields


def main(model_dir: str) -> None:
    world = MPI.COMM_WORLD
    import deepspeed  # noqa: F401 - import cost is not the model's
    import transformers  # noqa: F401
    gc.collect()
    uss0, pss0 = memory()
    layouts = {"tp2": Layout(tp=2), "pp2": Layout(pp=2)}
    rt = runtime_mod.start(model_dir, layouts, device_tokens=256, block_size=16)
    for name in layouts:
        rt.executor.activate(name)
        rt.executor.forward(ForwardPlan("prefill", [SeqWork(0, 0, [5, 6, 7, 8])], sink="device"))
        rt.executor.cache(name).allocator.free(0)
    gc.collect()
    uss1, pss1 = memory()
    window = mapping_of(rt.host._buffer.tensor.data_ptr())
    private = window.get("Private_Clean", 0) + window.get("Private_Dirty", 0)
    report = world.gather({"rank": world.Get_rank(), "uss_growth": uss1 - uss0, "pss_growth": pss1 - pss0,
                           "window_rss": window.get("Rss", 0), "window_pss": window.get("Pss", 0),
                           "uss_growth_outside_window": uss1 - uss0 - private}, root=0)
    if world.Get_rank() == 0:
        print("MEMORY " + json.dumps({"weight_bytes": rt.host.nbytes, "ranks": report}), flush=True)
    rt.close()


if __name__ == "__main__":
    main(sys.argv[1])
