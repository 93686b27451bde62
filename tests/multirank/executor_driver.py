"""Multi-rank check of the executor, run under mpiexec by test_executor.py.

For each model directory given, every rank starts one runtime holding all the named layouts of this rank
count, then for each layout: prefill a batch of uneven prompts plus greedy decode steps (DECODE_STEPS; 8 on
4 ranks, still across two KV blocks of 4), and rank 0 compares every step's logits (1e-4) and greedy tokens
with single-process transformers. Then it switches between two layouts ten times, new sequences after each
switch and SWITCH_STEPS decode steps, checking the same way. Prints one "OK ..." line per check on rank 0;
any mismatch raises (mpiexec then fails).

    mpiexec -n N python executor_driver.py [--layouts=NAME,...] [LABEL=]MODEL_DIR [[LABEL=]MODEL_DIR ...]

Each model's lines are labelled with LABEL, or the directory's name when none is given. ``--layouts`` limits
the static layouts of the models after it (every layout of the rank count before the first one).

Four ranks on a 2-core machine wait on the host's scheduler at every collective (~0.2 s a forward against
~0.02 s on two ranks), so the 4-rank run takes fewer steps per check: the same checks, shorter sequences.
"""
from __future__ import annotations

import os
import sys

import torch
from mpi4py import MPI

from seesaw_ds import runtime as runtime_mod
from seesaw_ds.distributed.layout import Layout
from seesaw_ds.distributed.waits import settle
from seesaw_ds.model.executor import ForwardPlan, SeqWork

DECODE_STEPS = {1: 16, 2: 16, 4: 8}
SWITCH_STEPS = {1: 4, 2: 4, 4: 2}
LONGEST_DECODE = max(DECODE_STEPS.values())
TOLERANCE = 1e-4
RELATIVE = 2e-6
"""Logits agree within TOLERANCE + RELATIVE * |transformers' logit| (torch.allclose's rule): the tiny models'
decisive logits reach ~50, where 1e-4 is ~16 float32 ulps, and transformers 5.25's Mixtral moved one logit by
1.09e-4 through summation order alone (any experts implementation)."""
LAYOUTS = {
    1: {"single": Layout()},
    2: {"tp2": Layout(tp=2), "pp2": Layout(pp=2), "dp2": Layout(dp=2)},
    4: {"tp4": Layout(tp=4), "pp4": Layout(pp=4), "tp2pp2": Layout(tp=2, pp=2), "dp2tp2": Layout(dp=2, tp=2),
        "dp2pp2": Layout(dp=2, pp=2)},
}
SWITCH_PAIRS = {1: ("single", "single"), 2: ("tp2", "pp2"), 4: ("tp2pp2", "tp4")}


def prompts_for(round_index: int, vocab: int, switch: int | None = None) -> list[list[int]]:
    """Uneven random prompts; for a longrope model that recomputes its cache at ``switch`` tokens, prompts
    that stay short through LONGEST_DECODE steps or are long from the start (the engine refuses the rest)."""
    generator = torch.Generator().manual_seed(1000 + round_index)
    lengths = [5, 11, 2, 17, 8][: 3 + round_index % 3]
    if switch is not None:
        lengths = [n for n in lengths if n + LONGEST_DECODE <= switch] + [switch + 3 + round_index]
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def reference(model, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Per prompt, logits [steps+1, vocab] of greedy generation with plain transformers."""
    out = []
    for prompt in prompts:
        generated = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        out.append(torch.stack([step[0] for step in generated.logits]).float())
    return out


def run_greedy(rt, name: str, prompts: list[list[int]], steps: int, first_id: int) -> dict[int, torch.Tensor]:
    """Prefill + ``steps`` greedy decode steps under layout ``name``; rank 0 gets {seq index: logits}."""
    executor = rt.executor
    comm = rt.topology.instance_comm
    executor.activate(name)
    dp = rt.layouts[name].dp
    ids = [first_id + i for i in range(len(prompts))]
    lengths = {seq: len(p) for seq, p in zip(ids, prompts)}
    collected: dict[int, list[torch.Tensor]] = {seq: [] for seq in ids}
    plan = ForwardPlan("prefill", [SeqWork(seq, seq % dp, p) for seq, p in zip(ids, prompts)], sink="device")
    for step in range(steps + 1):
        seq_ids, logits = executor.forward(plan)
        local = {} if logits is None or executor.groups.tp_index != 0 else dict(zip(seq_ids, logits))
        merged = {}
        settle(comm)  # rank 0 may be computing transformers' reference meanwhile (crowded: sleep, not spin)
        for part in comm.allgather(local):
            merged.update(part)
        for seq in ids:
            collected[seq].append(merged[seq])
        if step < steps:
            plan = ForwardPlan("decode", [SeqWork(seq, seq % dp, [int(merged[seq].argmax())], lengths[seq])
                                          for seq in ids])
            for seq in ids:
                lengths[seq] += 1
    cache = executor.cache(name)
    for seq in ids:
        cache.allocator.free(seq)
    return {i: torch.stack(collected[seq]) for i, seq in enumerate(ids)}


def check(label: str, got: dict[int, torch.Tensor], want: list[torch.Tensor]) -> None:
    worst = 0.0
    for index, expected in enumerate(want):
        actual = got[index]
        allowed = TOLERANCE + RELATIVE * expected.abs()
        worst = max(worst, ((actual - expected).abs() / allowed).max().item() * TOLERANCE)
        if not torch.equal(actual.argmax(-1), expected.argmax(-1)):
            raise AssertionError(f"{label}: greedy tokens differ for sequence {index}: "
                                 f"{actual.argmax(-1).tolist()} vs transformers {expected.argmax(-1).tolist()}")
    if worst > TOLERANCE:
        raise AssertionError(f"{label}: logits differ from transformers by {worst:.2e} > {TOLERANCE} (scaled by "
                             f"1 + {RELATIVE / TOLERANCE:g} |logit|)")
    print(f"OK {label} max|dlogit| (scaled)={worst:.2e}", flush=True)


def labelled(arg: str) -> tuple[str, str]:
    """(label, model directory) of a LABEL=DIR or plain DIR argument (then the directory's name)."""
    label, sep, model_dir = arg.partition("=")
    return (label, model_dir) if sep else (os.path.basename(os.path.normpath(arg)), arg)


def main(args: list[str]) -> None:
    world = MPI.COMM_WORLD
    size = world.Get_size()
    steps, switch_steps = DECODE_STEPS[size], SWITCH_STEPS[size]
    chosen = list(LAYOUTS[size])
    for arg in args:
        if arg.startswith("--layouts="):
            chosen = arg.split("=", 1)[1].split(",")
            unknown = set(chosen) - set(LAYOUTS[size])
            if unknown:
                raise SystemExit(f"--layouts: {sorted(unknown)} are not {size}-rank layouts ({sorted(LAYOUTS[size])})")
            continue
        family, model_dir = labelled(arg)
        from transformers import AutoConfig

        num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
        layouts = {name: LAYOUTS[size][name] for name in chosen if LAYOUTS[size][name].pp <= num_layers}
        ranks_per_node = int(os.environ.get("SEESAW_TEST_RANKS_PER_NODE", "0")) or None
        rt = runtime_mod.start(model_dir, layouts, device_tokens=1024, block_size=4, ranks_per_node=ranks_per_node)
        if world.Get_rank() == 0:
            nodes = rt.topology.env.info.num_nodes
            shm = {name: groups.shm_allreduce for name, groups in rt.topology.layouts.items()}
            print(f"OK topology nodes={nodes} shm_allreduce={shm}", flush=True)
        hf = None
        if world.Get_rank() == 0:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        vocab = rt.checkpoint.dims.vocab_size
        switch = rt.checkpoint.spec.length_switch
        prompts = prompts_for(0, vocab, switch)
        want = reference(hf, prompts, steps) if hf is not None else None
        next_id = 0
        for name in layouts:
            got = run_greedy(rt, name, prompts, steps, next_id)
            next_id += len(prompts)
            if want is not None:
                check(f"{family} {name}", got, want)
        first, second = SWITCH_PAIRS[size]
        for round_index in range(10):
            name = first if round_index % 2 == 0 else second
            prompts = prompts_for(round_index + 1, vocab, switch)
            got = run_greedy(rt, name, prompts, switch_steps, next_id)
            next_id += len(prompts)
            if hf is not None:
                check(f"{family} switch {round_index} -> {name}", got, reference(hf, prompts, switch_steps))
        if world.Get_rank() == 0:
            switches = rt.executor.switches
            print(f"OK {family} switches={len(switches)} max_switch_s={max(s.seconds for s in switches):.4f} "
                  f"bytes_moved={sum(s.bytes_moved for s in switches)}", flush=True)
        rt.close()


if __name__ == "__main__":
    main(sys.argv[1:])
