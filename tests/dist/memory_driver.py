"""Measures what loading the model costs each rank in host memory (run under mpiexec by test_memory.py).

Prints one JSON line on rank 0: the weights' bytes, and per rank the growth of its unique (USS) and
proportional (PSS) memory from before start-up to after a forward pass under each layout. One host copy per
node means the ranks' PSS growth adds up to about one copy and no rank's USS grows by a copy.
"""
from __future__ import annotations

import gc
import json
import sys

import psutil
from mpi4py import MPI

from seesaw_ds import runtime as runtime_mod
from seesaw_ds.dist.layout import Layout
from seesaw_ds.model.executor import ForwardPlan, SeqWork


def memory() -> tuple[int, int]:
    info = psutil.Process().memory_full_info()
    return info.uss, info.pss


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
    report = world.gather({"rank": world.Get_rank(), "uss_growth": uss1 - uss0, "pss_growth": pss1 - pss0}, root=0)
    if world.Get_rank() == 0:
        print("MEMORY " + json.dumps({"weight_bytes": rt.host.nbytes, "ranks": report}), flush=True)
    rt.close()


if __name__ == "__main__":
    main(sys.argv[1])
