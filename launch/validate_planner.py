"""Validate the planner on this machine: its predicted throughput of every layout against measured runs.

    python launch/validate_planner.py [--num-prompts 128] [--input-len 61 558] [--output-len 128]
        [--prompts FILE.jsonl] [--repeats 2] [--nproc 2] [--model DIR] [--dtype auto] [--out DIR]

Defaults: the real model (SmolLM2-135M-Instruct, bf16, fetched like a job's default) on the standard
workload's shape: 128 prompts of 61-558 tokens (token ids drawn at random from the vocabulary, or real text
from ``--prompts``, a file of chat ``messages`` lines put through the chat template), 128 output tokens each,
greedy, ``ignore_eos``. The planner's timings depend on the lengths only, not on the token ids.

Calibrates the machine as ``parallel=auto`` does (seesaw_ds/sim/calibrate.py, with the engine's own profile
on the model, seesaw_ds/sim/profile.py), predicts every candidate's throughput with the same planner
(seesaw_ds/sim/auto.py), then runs each candidate for real through the benchmark's seesaw_ds peer
(seesaw_ds/bench/peers.py), ``--repeats`` times interleaved (the machine is shared: every round runs all
candidates once), and prints a table (predicted and measured output tokens/s, their ratio, ranks, the
measured spread) and Spearman's rank correlation. Candidates: ``single`` (one rank with all the cores) and
every layout and pair of ``--nproc`` ranks the model can shard. Writes validation.json and validation.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from seesaw_ds.distributed.layout import Layout  # noqa: E402

CANDIDATES_2 = [("dp2", "dp2"), ("tp2", "tp2"), ("pp2", "pp2"), ("pp2", "tp2"), ("dp2", "tp2"), ("pp2", "dp2"),
                ("tp2", "dp2"), ("dp2", "pp2")]
NAMED = {"single": Layout(), "dp2": Layout(dp=2), "tp2": Layout(tp=2), "pp2": Layout(pp=2)}


def ranks(values: list[float]) -> list[float]:
    """1 = the largest; ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties averaged)."""
    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denominator) if denominator else float("nan")


def build_workload(args, model_dir: Path, max_positions: int, vocab: int):
    """The benchmark workload the runs get (seesaw_ds/bench/workloads.py)."""
    from transformers import AutoTokenizer

    from seesaw_ds.bench.workloads import Workload as BenchWorkload
    from seesaw_ds.bench.workloads import random_workload, token_id_range

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.prompts is None:
        return random_workload(args.num_prompts, input_len=tuple(args.input_len),
                               output_len=(args.output_len, args.output_len),
                               token_range=token_id_range(min(len(tokenizer), vocab), tokenizer.all_special_ids),
                               max_model_len=max_positions, seed=0)
    prompts = []
    for line in Path(args.prompts).read_text().splitlines():
        if line.strip() and len(prompts) < args.num_prompts:
            ids = tokenizer.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=True,
                                                tokenize=True)
            prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no chat lines")
    return BenchWorkload(Path(args.prompts).stem, prompts, [args.output_len] * len(prompts))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, nargs=2, default=(61, 558))
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompts", default=None, help="JSONL of chat `messages` lines (default: random ids)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the real model, SmolLM2)")
    parser.add_argument("--dtype", default="auto", help="model.dtype of the runs (auto: the checkpoint's)")
    parser.add_argument("--only", nargs="*", default=None, help="candidate labels to run (default: all)")
    parser.add_argument("--predict-only", action="store_true", help="print the predictions, run nothing")
    parser.add_argument("--out", default=None, help="results dir (default: runs/validate_planner/<time>)")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.nproc != 2:
        parser.error("only --nproc 2 has a candidate list (single, static dp2, tp2, pp2 and the pairs of them)")

    from seesaw_ds.bench import peers as peer_runs
    from seesaw_ds.cli import cache_dir
    from seesaw_ds.distributed.layout import LayoutError, validate_layout
    from seesaw_ds.model.pretrained import ensure_smollm2
    from seesaw_ds.sim.auto import JobFacts, checkpoint_facts, device_tokens_cap, family_usable, job_dtype
    from seesaw_ds.sim.auto import make_planner
    from seesaw_ds.sim.calibrate import measure

    out = Path(args.out) if args.out else REPO / "runs" / "validate_planner" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else ensure_smollm2(cache_dir())
    dtype = job_dtype(model_dir, args.dtype)
    dims, dtype_bytes, max_positions, vocab = checkpoint_facts(model_dir, dtype)
    bench_workload = build_workload(args, model_dir, max_positions, vocab)
    input_jsonl = bench_workload.write_jsonl(out / "input.jsonl")
    workload = bench_workload.lengths()
    usable = family_usable(model_dir)

    def runnable(layout: Layout) -> bool:
        try:
            validate_layout("candidate", layout, dims)
        except LayoutError:
            return False
        return usable(layout)

    calibrations, planners = {}, {}
    for ranks in ((args.nproc,) if args.only and "single" not in args.only else (1, args.nproc)):
        calibrations[ranks] = measure(ranks=ranks, dtype=dtype, model_path=str(model_dir))
        facts = JobFacts(num_ranks=ranks, dtype_bytes=dtype_bytes,
                         device_tokens=device_tokens_cap(workload, ranks, 16))
        planners[ranks] = make_planner(facts, calibrations[ranks], dims, workload)
    rows = []
    for prefill_name, decode_name in [("single", "single"), *CANDIDATES_2]:
        prefill, decode = NAMED[prefill_name], NAMED[decode_name]
        label = prefill_name if prefill == decode else f"{prefill_name}->{decode_name}"
        if not (runnable(prefill) and runnable(decode)) or (args.only and label not in args.only):
            continue
        nproc = prefill.dp * prefill.tp * prefill.pp
        candidate = planners[nproc].simulate_pair(prefill, decode)
        rows.append({"candidate": label, "prefill": prefill, "decode": decode, "nproc": nproc,
                     "predicted": candidate.result.output_throughput if candidate else float("nan"),
                     "predicted_phase_s": candidate.result.phase_s if candidate else {},
                     "measured_runs": [], "phase_runs": []})
    for ranks, calibration in calibrations.items():
        profile = calibration.profile.to_json() if calibration.profile else None
        print(f"[validate] calibration, {ranks} rank(s): matmul {calibration.matmul_flops / 1e9:.0f} GFLOP/s "
              f"({dtype}, one core); engine profile: {json.dumps(profile)}", flush=True)
    print(f"[validate] workload: {workload.num_requests} prompts ({workload.prompt_lens.min()}-"
          f"{workload.prompt_lens.max()} tokens), {workload.prompt_tokens} prompt + {workload.output_tokens} "
          f"output tokens", flush=True)
    for row in rows:
        print(f"[validate] predicted {row['candidate']:<10} {row['predicted']:8.1f} output tokens/s "
              f"{json.dumps({k: round(v, 2) for k, v in row['predicted_phase_s'].items()})}", flush=True)
    if args.predict_only:
        return 0

    for repeat in range(args.repeats):
        for row in rows:
            prefill, decode, nproc = row["prefill"], row["decode"], row["nproc"]
            device_tokens = device_tokens_cap(workload, nproc, 16)
            overrides = [*(f"parallel.prefill.{a}={getattr(prefill, a)}" for a in ("dp", "tp", "pp")),
                         *(f"parallel.decode.{a}={getattr(decode, a)}" for a in ("dp", "tp", "pp")),
                         f"kv.device_tokens={device_tokens}", f"scheduler.max_decode_seqs={256 * decode.pp}",
                         f"model.dtype={dtype}", "sampling.temperature=0", "sampling.ignore_eos=true"]
            spec = peer_runs.PeerSpec(row["candidate"].replace("->", "_to_"), "seesaw", overrides)
            result = peer_runs.run_seesaw(spec, model_dir, input_jsonl, out / "runs" / f"{spec.name}.{repeat}",
                                          nproc=nproc, timeout_s=args.timeout)
            value = result.metrics["output_tokens_per_second"] if result.ok else float("nan")
            row["measured_runs"].append(value)
            row["phase_runs"].append((result.details or {}).get("phase_seconds"))
            print(f"[validate] round {repeat + 1}: {row['candidate']:<10} {value:8.1f} output tokens/s "
                  f"(predicted {row['predicted']:.0f}) phases {row['phase_runs'][-1]}"
                  f"{'' if result.ok else ' ' + str(result.reason)}", flush=True)

    for row in rows:
        runs = [v for v in row["measured_runs"] if v == v]
        row["measured"] = statistics.median(runs) if runs else float("nan")
        row["spread_pct"] = 100 * (max(runs) - min(runs)) / row["measured"] if len(runs) > 1 else 0.0
        row["ratio"] = row["predicted"] / row["measured"] if row["measured"] else float("nan")
    predicted_rank = ranks([r["predicted"] for r in rows])
    measured_rank = ranks([r["measured"] for r in rows])
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    rho_runs = [spearman([r["predicted"] for r in rows], [r["measured_runs"][i] for r in rows])
                for i in range(args.repeats)]
    lines = ["| candidate | predicted output tok/s | measured (median) | predicted / measured | runs | spread | "
             "predicted rank | measured rank |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for row, pr, mr in zip(rows, predicted_rank, measured_rank):
        lines.append(f"| {row['candidate']} | {row['predicted']:.0f} | {row['measured']:.0f} | {row['ratio']:.2f} | "
                     f"{', '.join(f'{v:.0f}' for v in row['measured_runs'])} | {row['spread_pct']:.0f}% | "
                     f"{pr:g} | {mr:g} |")
    worst = max(abs(r["ratio"] - 1) for r in rows) if rows else float("nan")
    summary = (f"Spearman rho (median of runs) = {rho:.2f}; per round: " + ", ".join(f"{x:.2f}" for x in rho_runs)
               + f"; largest prediction error {100 * worst:.0f}%")
    table = "\n".join(lines)
    print(table + "\n" + summary, flush=True)
    command = "python launch/validate_planner.py " + " ".join(argv)
    (out / "validation.md").write_text(f"Command: `{command}`\n\n{table}\n\n{summary}\n")
    for row in rows:
        row["prefill"], row["decode"] = str(row["prefill"]), str(row["decode"])
    (out / "validation.json").write_text(json.dumps(
        {"command": command, "dtype": dtype, "calibrations": {r: c.to_json() for r, c in calibrations.items()},
         "workload": {"num_requests": workload.num_requests, "prompt_tokens": workload.prompt_tokens,
                      "output_tokens": workload.output_tokens}, "rows": rows, "spearman": rho,
         "spearman_per_round": rho_runs}, indent=2))
    print(f"[validate] wrote {out / 'validation.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
