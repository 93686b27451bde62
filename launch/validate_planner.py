"""Validate the planner on this machine: its predicted ranking of layouts against measured seesaw_ds runs.

    python launch/validate_planner.py [--num-prompts 32] [--input-len 20 200] [--output-len 32]
        [--repeats 2] [--nproc 2] [--model DIR] [--out DIR]

Calibrates the machine (seesaw_ds/sim/calibrate.py), predicts every candidate's throughput with the same
planner ``parallel=auto`` uses (seesaw_ds/sim/auto.py), then runs each candidate for real through the
benchmark's seesaw_ds peer (seesaw_ds/bench/peers.py), ``--repeats`` times interleaved (the machine is
shared: every round runs all candidates once), and prints a table (predicted and measured tokens/s, their
ranks, the measured spread) and Spearman's rank correlation. Writes validation.json and validation.md.
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
                ("tp2", "dp2")]
NAMED = {"dp2": Layout(dp=2), "tp2": Layout(tp=2), "pp2": Layout(pp=2)}


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, nargs=2, default=(20, 200))
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the benchmark model)")
    parser.add_argument("--out", default=None, help="results dir (default: runs/validate_planner/<time>)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.nproc != 2:
        parser.error("only --nproc 2 has a candidate list (static dp2, tp2, pp2 and four Seesaw pairs)")

    from transformers import AutoTokenizer

    from seesaw_ds.bench import peers as peer_runs
    from seesaw_ds.bench.runner import ensure_bench_model
    from seesaw_ds.bench.workloads import random_workload, token_id_range
    from seesaw_ds.sim.auto import JobFacts, checkpoint_facts, device_tokens_cap, make_planner
    from seesaw_ds.sim.calibrate import measure
    from seesaw_ds.sim.workload import Workload

    out = Path(args.out) if args.out else REPO / "runs" / "validate_planner" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else ensure_bench_model(REPO / ".cache" / "bench")
    dims, dtype_bytes, max_positions, vocab = checkpoint_facts(model_dir, "auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bench_workload = random_workload(args.num_prompts, input_len=tuple(args.input_len),
                                     output_len=(args.output_len, args.output_len),
                                     token_range=token_id_range(min(len(tokenizer), vocab), tokenizer.all_special_ids),
                                     max_model_len=max_positions, seed=0)
    input_jsonl = bench_workload.write_jsonl(out / "input.jsonl")
    workload = Workload("validation", np.array(bench_workload.prompt_lens), np.array(bench_workload.output_lens))
    device_tokens = device_tokens_cap(workload, args.nproc, 16)

    calibration = measure(ranks=args.nproc, dtype={4: "float32", 2: "bfloat16"}[dtype_bytes])
    facts = JobFacts(num_ranks=args.nproc, dtype_bytes=dtype_bytes, device_tokens=device_tokens)
    planner = make_planner(facts, calibration, dims, workload)
    rows = []
    for prefill_name, decode_name in CANDIDATES_2:
        prefill, decode = NAMED[prefill_name], NAMED[decode_name]
        candidate = planner.simulate_pair(prefill, decode)
        label = prefill_name if prefill == decode else f"{prefill_name}->{decode_name}"
        rows.append({"candidate": label, "prefill": prefill, "decode": decode,
                     "predicted": candidate.result.throughput if candidate else float("nan"), "measured_runs": []})
    print(f"[validate] calibration: {json.dumps(calibration.to_json())}", flush=True)
    print(f"[validate] workload: {workload.num_requests} prompts, {workload.prompt_tokens} prompt + "
          f"{workload.output_tokens} output tokens; kv.device_tokens={device_tokens}", flush=True)

    for repeat in range(args.repeats):
        for row in rows:
            prefill, decode = row["prefill"], row["decode"]
            overrides = [*(f"parallel.prefill.{a}={getattr(prefill, a)}" for a in ("dp", "tp", "pp")),
                         *(f"parallel.decode.{a}={getattr(decode, a)}" for a in ("dp", "tp", "pp")),
                         f"kv.device_tokens={device_tokens}", f"scheduler.max_decode_seqs={256 * decode.pp}",
                         "sampling.temperature=0", "sampling.ignore_eos=true"]
            spec = peer_runs.PeerSpec(row["candidate"].replace("->", "_to_"), "seesaw", overrides)
            result = peer_runs.run_seesaw(spec, model_dir, input_jsonl, out / "runs" / f"{spec.name}.{repeat}",
                                          nproc=args.nproc, timeout_s=args.timeout)
            value = result.metrics["tokens_per_second"] if result.ok else float("nan")
            row["measured_runs"].append(value)
            print(f"[validate] round {repeat + 1}: {row['candidate']:<10} {value:8.1f} tokens/s "
                  f"(predicted {row['predicted']:.0f}){'' if result.ok else ' ' + str(result.reason)}", flush=True)

    for row in rows:
        runs = [v for v in row["measured_runs"] if v == v]
        row["measured"] = statistics.median(runs) if runs else float("nan")
        row["spread_pct"] = 100 * (max(runs) - min(runs)) / row["measured"] if len(runs) > 1 else 0.0
    predicted_rank = ranks([r["predicted"] for r in rows])
    measured_rank = ranks([r["measured"] for r in rows])
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    rho_runs = [spearman([r["predicted"] for r in rows], [r["measured_runs"][i] for r in rows])
                for i in range(args.repeats)]
    lines = ["| candidate | predicted tok/s | measured tok/s (median) | runs | spread | predicted rank | measured rank |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for row, pr, mr in zip(rows, predicted_rank, measured_rank):
        lines.append(f"| {row['candidate']} | {row['predicted']:.0f} | {row['measured']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in row['measured_runs'])} | {row['spread_pct']:.0f}% | "
                     f"{pr:g} | {mr:g} |")
    summary = (f"Spearman rho (median of runs) = {rho:.2f}; per round: "
               + ", ".join(f"{x:.2f}" for x in rho_runs))
    table = "\n".join(lines)
    print(table + "\n" + summary, flush=True)
    command = "python launch/validate_planner.py " + " ".join(argv)
    (out / "validation.md").write_text(f"Command: `{command}`\n\n{table}\n\n{summary}\n")
    for row in rows:
        row["prefill"], row["decode"] = str(row["prefill"]), str(row["decode"])
    (out / "validation.json").write_text(json.dumps(
        {"command": command, "calibration": calibration.to_json(), "device_tokens": device_tokens,
         "workload": {"num_requests": workload.num_requests, "prompt_tokens": workload.prompt_tokens,
                      "output_tokens": workload.output_tokens}, "rows": rows, "spearman": rho,
         "spearman_per_round": rho_runs}, indent=2))
    print(f"[validate] wrote {out / 'validation.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
