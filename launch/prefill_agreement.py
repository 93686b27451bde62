"""bf16 engines against a float32 reference of the same model: transformers in bf16, and seesaw_ds in bf16 with
the CPU prefill attention as ATen's SDPA per prompt (``kernels.PREFILL_BLOCK_ROWS=0``) and as float32 GEMMs
over blocks of query rows (``--rows``, default 32).

For every prompt each engine decodes greedily; the float32 model (transformers, eager) then reads each engine's
own path (teacher forcing), so that every step is judged, not only those before a first divergence:

- ``agree``: greedy tokens before the first difference from the float32 model's own greedy path, summed;
- ``off-top``: steps whose token is not the float32 model's argmax on that engine's path, and the largest
  float32 margin (top logit minus the chosen token's) among them: a near-tie has a margin under the bf16
  logits error, a wrong engine picks tokens far below the top;
- ``logits err``: the engine's logits against the float32 model's on the same path, max and RMS of the
  absolute difference over every step (the first, the prompt's last position, is where prefill attention
  alone acts; listed apart).

    .venv/bin/python launch/prefill_agreement.py --model tiny      # the GPU check's tiny model and prompts
    .venv/bin/python launch/prefill_agreement.py --model smollm2   # SmolLM2-135M-Instruct, chat prompts
    .venv/bin/python launch/prefill_agreement.py --model smollm2 --workload runs/<bench>/workload.json
    .venv/bin/python launch/prefill_agreement.py --model operator  # the prefill kernel alone, against float64

One rank in-process (the single-rank MPI stand-in of tests/gpu where mpi4py lacks MPI), eager, one thread
unless OMP_NUM_THREADS says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "gpu"))
sys.path.insert(0, str(REPO))


def tiny_case(work: Path):
    """The GPU check's tiny model (5 layers) and both of its prompt sets, 12 greedy tokens each."""
    import check
    from seesaw_ds.model.tiny import make_tiny_model

    model_dir = make_tiny_model(work / "tiny", "llama", num_layers=5)
    prompts = check._prompts(check.JOB_PROMPT_LENGTHS, seed=7) + check._prompts(check.STEP_PROMPT_LENGTHS, seed=11)
    return model_dir, prompts, check.MAX_TOKENS


def smollm2_case(count: int, steps: int, workload: str | None):
    """SmolLM2-135M-Instruct and the first ``count`` bundled chat prompts through its chat template, or the
    first ``count`` prompts of a bench run's ``workload.json``."""
    from transformers import AutoTokenizer

    from seesaw_ds.cache import cache_root

    model_dir = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if workload:
        return model_dir, json.loads(Path(workload).read_text())["prompts"][:count], steps
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = (REPO / "seesaw_ds" / "data" / "chat_prompts.jsonl").read_text().splitlines()[:count]
    prompts = [list(tokenizer.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for line in lines]
    return model_dir, prompts, steps


def transformers_paths(model_dir: Path, prompts, steps: int, dtype):
    """transformers' greedy continuations in ``dtype`` and their logits per step (float32, [steps, vocab])."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    paths, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                 min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
            paths.append(out.sequences[0, len(prompt):].tolist())
            logits.append(torch.cat(out.logits).float())
    return paths, logits


def teacher_forced(model_dir: Path, prompts, paths):
    """The float32 model's logits at every step of each path ([steps, vocab])."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, path in zip(prompts, paths):
            ids = torch.tensor([prompt + path[:-1]])
            out.append(model(ids).logits[0, len(prompt) - 1:].float())
    return out


def transformers_forced(model_dir: Path, prompts, paths, dtype):
    """transformers' logits in ``dtype`` along the given paths (one forward over prompt + path, no cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return [model(torch.tensor([prompt + path[:-1]])).logits[0, len(prompt) - 1:].float()
                for prompt, path in zip(prompts, paths)]


def engine_paths(runtime, prompts, steps: int, rows: int, first_id: int, forced=None):
    """seesaw_ds's greedy continuations (all prompts prefilled in one packed step, then decoded together)
    with ``kernels.PREFILL_BLOCK_ROWS = rows``, and its logits per step; ``forced``: paths whose tokens are
    fed instead of its own choices (teacher forcing), so that engines compare on the same inputs."""
    import torch

    from seesaw_ds.model import kernels
    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    kernels.PREFILL_BLOCK_ROWS = rows
    executor = runtime.executor
    executor.activate("prefill")
    ids = [first_id + i for i in range(len(prompts))]
    tokens = {seq: [] for seq in ids}
    logits = {seq: [] for seq in ids}

    def take(seq_ids, step_logits):
        for seq, row in zip(seq_ids, step_logits.float()):
            logits[seq].append(row)
            tokens[seq].append(int(row.argmax()))
    take(*executor.forward(ForwardPlan("prefill", [SeqWork(seq, 0, list(p)) for seq, p in zip(ids, prompts)])))
    executor.activate("decode")
    for _ in range(steps - 1):
        fed = lambda i, seq: tokens[seq][-1] if forced is None else forced[i][len(tokens[seq]) - 1]  # noqa: E731
        works = [SeqWork(seq, 0, [fed(i, seq)], len(p) + len(tokens[seq]) - 1)
                 for i, (seq, p) in enumerate(zip(ids, prompts))]
        take(*executor.forward(ForwardPlan("decode", works)))
    for seq in ids:
        executor.cache().allocator.free(seq)
    return [tokens[seq] for seq in ids], [torch.stack(logits[seq]) for seq in ids]


def judge(name: str, paths, logits, reference, forced) -> dict:
    """One engine's figures against the float32 model (``reference``: its greedy paths; ``forced``: its logits
    on this engine's paths)."""
    agree = total = off_top = steps = 0
    worst_margin, first_err, errors, firsts = 0.0, 0.0, [], []
    for path, own, want, fp32 in zip(paths, logits, reference, forced):
        agree += next((i for i, (a, b) in enumerate(zip(path, want)) if a != b), len(want))
        total += len(want)
        for step, token in enumerate(path):
            steps += 1
            top = float(fp32[step].max())
            if int(fp32[step].argmax()) != token:
                off_top += 1
                worst_margin = max(worst_margin, top - float(fp32[step, token]))
        difference = (own - fp32).abs()
        first_err = max(first_err, float(difference[0].max()))
        firsts.append(difference[0])
        errors.append(difference)
    flat = [e.flatten() for e in errors]
    import torch

    every = torch.cat(flat)
    return {"engine": name, "agree": agree, "tokens": total, "off_top": off_top, "steps": steps,
            "worst_off_top_margin": worst_margin, "max_err": float(every.max()),
            "rms_err": math.sqrt(float((every.double() ** 2).mean())), "first_step_max_err": first_err,
            "first_step_rms_err": math.sqrt(float((torch.cat(firsts).double() ** 2).mean()))}


def operator_level() -> None:
    """The prefill kernel alone (SDPA, rows=0, and the float32 GEMMs) in bf16 against float64 attention over
    the same bf16 inputs: SmolLM2's heads (9 query, 3 KV, size 64), prompts of 3-558 tokens, random q/k/v."""
    import torch

    from seesaw_ds.model import kernels
    from seesaw_ds.model.attention_reference import prefill_reference

    assert kernels.built()
    torch.manual_seed(0)
    bounds = [0]
    for length in (61, 130, 257, 400, 558, 17, 3):
        bounds.append(bounds[-1] + length)
    q, k, v = (torch.randn(heads, bounds[-1], 64).bfloat16() for heads in (9, 3, 3))
    exact = prefill_reference(q[None].double(), k[None].double(), v[None].double(), bounds, 64 ** -0.5, None,
                              None)[0]
    rows = kernels.PREFILL_BLOCK_ROWS
    for name, value in (("SDPA (rows=0)", 0), ("float32 GEMMs (rows=32)", 32), ("float64 rounded to bf16", None)):
        if value is None:
            out = exact.bfloat16()
        else:
            kernels.PREFILL_BLOCK_ROWS = value
            out = kernels.prefill_attention(q, k, v, torch.tensor(bounds), 64 ** -0.5)
        error = out.double() - exact
        print(f"operator, {name}: max error {error.abs().max():.3e}, RMS {error.pow(2).mean().sqrt():.3e}")
    kernels.PREFILL_BLOCK_ROWS = rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2", "operator"), default="tiny",
                        help="operator: the prefill kernel alone against float64")
    parser.add_argument("--rows", type=int, default=32, help="PREFILL_BLOCK_ROWS of the float32-GEMM path")
    parser.add_argument("--prompts", type=int, default=6, help="smollm2: chat prompts")
    parser.add_argument("--steps", type=int, default=32, help="smollm2: greedy tokens per prompt")
    parser.add_argument("--workload", default=None, help="smollm2: the prompts of a bench run's workload.json "
                        "instead of the bundled chat prompts")
    parser.add_argument("--paired", action="store_true", help="every engine fed the float32 greedy path "
                        "(teacher forcing): logits errors on the same inputs; the token columns then mean nothing")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    import torch

    if args.model == "operator":
        operator_level()
        return 0
    import single_rank_mpi

    single_rank_mpi.install()
    from seesaw_ds import runtime as runtime_mod
    from seesaw_ds.distributed.layout import Layout

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prompts, steps = (tiny_case(Path(tmp)) if args.model == "tiny"
                                     else smollm2_case(args.prompts, args.steps, args.workload))
        reference, _ = transformers_paths(model_dir, prompts, steps, torch.float32)
        runs = {} if args.paired else {"transformers bf16": transformers_paths(model_dir, prompts, steps,
                                                                                torch.bfloat16)}
        longest = max(map(len, prompts)) + steps
        rt = runtime_mod.start(str(model_dir), {"prefill": Layout(), "decode": Layout()}, dtype="bfloat16",
                               block_size=16, device_tokens=16 * len(prompts) * (longest // 16 + 2),
                               compile=False)
        forced = reference if args.paired else None
        runs["seesaw bf16, SDPA (rows=0)"] = engine_paths(rt, prompts, steps, 0, 0, forced)
        runs[f"seesaw bf16, fp32 GEMMs (rows={args.rows})"] = engine_paths(rt, prompts, steps, args.rows, 1000,
                                                                          forced)
        rt.close()
        if args.paired:  # every engine's logits along the float32 greedy paths
            runs["transformers bf16"] = (reference, transformers_forced(model_dir, prompts, reference,
                                                                         torch.bfloat16))
            runs = {name: (reference, logits) for name, (_, logits) in runs.items()}
        rows = [judge(name, paths, logits, reference, teacher_forced(model_dir, prompts, paths))
                for name, (paths, logits) in runs.items()]
    print(f"{args.model}: {len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
          f"{steps} greedy tokens each, against transformers float32 (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print("| engine | agree before 1st difference | off the fp32 top (worst margin) | logits err max / RMS "
          "| 1st step (prefill) err max / RMS |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['agree']}/{r['tokens']} | {r['off_top']}/{r['steps']} "
              f"({r['worst_off_top_margin']:.3f}) | {r['max_err']:.3f} / {r['rms_err']:.4f} "
              f"| {r['first_step_max_err']:.3f} / {r['first_step_rms_err']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
