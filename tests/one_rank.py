"""A one-rank executor over a real checkpoint in the test process (node-shared weights over MPI.COMM_SELF, no
process groups): what tests/unit/test_compiled.py and test_graphs.py drive step by step."""
from __future__ import annotations

from types import SimpleNamespace

import torch

CPU = torch.device("cpu")

PROMPTS = [[5, 9, 17, 33, 2, 8, 101], [7, 3, 250, 11], [4] * 13]


def executor(checkpoint_dir, dtype: str, compile_mode: bool = False, prepack: bool = True, **options):
    """The executor of one rank whose prefill and decode layouts are both one rank (``options``: more
    :class:`~seesaw_ds.model.executor.Executor` keywords), the decode layout active."""
    from mpi4py import MPI

    from seesaw_ds.distributed.layout import Layout
    from seesaw_ds.model.executor import Executor
    from seesaw_ds.model.loader import HostWeights, open_checkpoint, parse_dtype, plan_host_tensors
    from seesaw_ds.model.template import build_template, parameter_shapes

    checkpoint = open_checkpoint(str(checkpoint_dir))
    template = build_template(checkpoint.config)
    plan = plan_host_tensors(checkpoint, parameter_shapes(template))
    host = HostWeights(checkpoint, plan, MPI.COMM_SELF, parse_dtype(dtype, checkpoint.config_dtype))
    groups = SimpleNamespace(layout=Layout(), dp_index=0, pp_index=0, tp_index=0, tp_ranks=(0,), pp_ranks=(0,),
                             tp_group=None, tp_host_group=None, shm_allreduce=False, is_first_stage=True,
                             is_last_stage=True, prev_rank=None, next_rank=None)
    topology = SimpleNamespace(layouts={"prefill": groups, "decode": groups}, instance_rank=0,
                               env=SimpleNamespace(rank=0))
    options.setdefault("device_tokens", 4096)
    made = Executor(topology, host, template, checkpoint.spec, device=CPU, compile=compile_mode, prepack=prepack,
                    **options)
    made.activate("decode")
    return made


def generate(executor, steps: int = 5, prompts=PROMPTS) -> list[torch.Tensor]:
    """Logits of a packed prefill of ``prompts``, then of ``steps`` greedy decode steps."""
    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    _, logits = executor.forward(ForwardPlan("prefill", [SeqWork(i, 0, p) for i, p in enumerate(prompts)],
                                             sink="device"))
    out, lengths = [logits], [len(p) for p in prompts]
    for _ in range(steps):
        tokens = out[-1].argmax(-1).tolist()
        work = [SeqWork(i, 0, [tokens[i]], start=lengths[i]) for i in range(len(prompts))]
        out.append(executor.forward(ForwardPlan("decode", work))[1])
        lengths = [n + 1 for n in lengths]
    return out
