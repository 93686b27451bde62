"""One benchmark run: the model and workload, the machine's measure, every peer in turn, the report.

Files in the run directory: ``workload.json`` / ``input.jsonl`` (what every peer ran), ``peers/<name>/``
(each peer's logs and outputs), ``results.json`` (everything), ``<name>.throughput.json`` per peer (exactly
the keys of ``vllm bench throughput`` plus ``output_tokens_per_second``), ``results.md`` (the tables) and
``throughput.png`` (the plot).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from seesaw_ds.bench import machine, peers as peer_runs, profile as profiling
from seesaw_ds.bench.config import BenchConfig
from seesaw_ds.bench.report import (THROUGHPUT_KEYS, ModelShape, Target, fraction_of_roofline, markdown_table,
                                    ratio_matrix, roofline_seconds, throughput_line, workload_flops)
from seesaw_ds.bench.workloads import Workload, make_workload, token_id_range

REPO = peer_runs.REPO
BENCH_MODEL_NAME = "bench-llama"
CORPUS = REPO / "seesaw_ds" / "data" / "tokenizer_corpus.txt"
_TARGET = re.compile(r"^\s*([\w.-]+)\s*>=\s*([0-9.]+)\s*\*\s*([\w.-]+)\s*$")


def parse_target(text: str) -> Target:
    """``"seesaw>=1.5*vllm"`` -> Target("seesaw", "vllm", 1.5)."""
    match = _TARGET.match(text)
    if not match:
        raise ValueError(f"bench.targets entry {text!r} is not of the form peer>=factor*other")
    return Target(match.group(1), match.group(3), float(match.group(2)))


def _repo_path(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else REPO / candidate


def ensure_bench_model(cache_dir: Path) -> Path:
    """The standard benchmark model (``BENCHMARK_MODEL_KWARGS``) under ``cache_dir``, built once."""
    from seesaw_ds.model.tiny import BENCHMARK_MODEL_KWARGS, is_complete_checkpoint, make_tiny_model, read_manifest

    target = cache_dir / BENCH_MODEL_NAME
    manifest = read_manifest(target) or {}
    if is_complete_checkpoint(target) and all(manifest.get(k) == v for k, v in BENCHMARK_MODEL_KWARGS.items()):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BENCH_MODEL_NAME}.", dir=cache_dir))
    try:
        make_tiny_model(tmp / "model", "llama", **BENCHMARK_MODEL_KWARGS)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        (tmp / "model").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(settings: BenchConfig) -> Path:
    """The checkpoint every peer serves: ``model.path``, else the model ``model.name`` names."""
    model = settings.model
    if model.path:
        return _repo_path(model.path)
    if model.name == "bench_tiny":
        return ensure_bench_model(_repo_path(model.cache_dir))
    if model.name == "smollm2":
        from seesaw_ds.cli import cache_dir
        from seesaw_ds.model.pretrained import ensure_smollm2

        return Path(ensure_smollm2(cache_dir()))
    raise ValueError(f"model.name={model.name!r}: expected smollm2 or bench_tiny (or give model.path)")


def build_workload(settings: BenchConfig, model_dir: Path) -> tuple[Workload, int]:
    """The run's workload on ``model_dir``'s vocabulary, and the model's context length."""
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_model_len = int(config["max_position_embeddings"])
    vocab = min(len(tokenizer), int(config["vocab_size"]))
    spec = settings.workload
    workload = make_workload(spec.kind, num_prompts=settings.bench.num_prompts, seed=settings.bench.seed,
                             token_range=token_id_range(vocab, tokenizer.all_special_ids),
                             max_model_len=max_model_len, input_len=(spec.input_len_min, spec.input_len_max),
                             output_len=(spec.output_len_min, spec.output_len_max), path=spec.path,
                             tokenize=lambda text: tokenizer(text)["input_ids"],
                             apply_chat_template=lambda messages: list(tokenizer.apply_chat_template(
                                 messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]),
                             corpus=CORPUS.read_text() if spec.kind in ("chat", "shared_prefix") else None,
                             prefix_len=spec.prefix_len, prompt_tail=spec.prompt_tail)
    return workload, max_model_len


def run_peer(name: str, settings: BenchConfig, model_dir: Path, run_dir: Path, workload_json: Path,
             input_jsonl: Path, max_model_len: int) -> peer_runs.PeerResult:
    definition = settings.peer_defs.get(name)
    if definition is None:
        return peer_runs.PeerResult(name, "?", "unavailable",
                                    f"no peer_defs.{name}; known: {', '.join(settings.peer_defs)}")
    spec = peer_runs.PeerSpec(name, definition.kind, list(definition.overrides), definition.description)
    work_dir = run_dir / "peers" / name
    bench = settings.bench
    dtype = definition.dtype or settings.model.dtype
    if spec.kind == "seesaw":
        spec.overrides = [f"model.dtype={dtype}", *bench.seesaw_overrides, *spec.overrides]
        return peer_runs.run_seesaw(spec, model_dir, input_jsonl, work_dir, nproc=bench.nproc,
                                    timeout_s=bench.timeout_s, profile=bench.profile,
                                    extra_env=dict(definition.env))
    if spec.kind == "transformers":
        hf = settings.transformers
        return peer_runs.run_transformers(spec, model_dir, workload_json, work_dir, threads=hf.threads,
                                          batch_size=hf.batch_size, search_candidates=list(hf.search_candidates),
                                          timeout_s=bench.timeout_s, search_prompts=hf.search_prompts,
                                          search_output_len=hf.search_output_len, dtype=dtype)
    if spec.kind == "vllm":
        vl = settings.vllm
        return peer_runs.run_vllm(spec, model_dir, workload_json, work_dir, venv=_repo_path(vl.venv),
                                  max_model_len=max_model_len, kv_cache_gib=vl.kv_cache_gib, seed=bench.seed,
                                  timeout_s=bench.timeout_s, env_extra={**vl.env, **definition.env},
                                  engine_args=dict(vl.engine_args), dtype=dtype)
    return peer_runs.PeerResult(name, spec.kind, "unavailable",
                                f"peer_defs.{name}.kind={spec.kind!r}; expected one of {peer_runs.KINDS}")


def analyse(results: list[peer_runs.PeerResult], workload: Workload, shape: ModelShape, machine_info: dict,
            nproc: int, targets: list[Target], reference: str) -> dict:
    """Roofline, fractions, ratios, targets and agreement of a finished run (pure given its inputs)."""
    flops = workload_flops(shape, workload.prompt_lens, workload.output_lens)
    gflops = machine_info.get("matmul_gflops_cores", {}).get(str(nproc))
    roofline = None
    if gflops:
        seconds = roofline_seconds(flops["total"], gflops)
        roofline = {"flops": flops, "gflops": gflops, "threads": nproc, "seconds": seconds,
                    "output_tokens_per_second": workload.num_output_tokens / seconds}
    ok = [r for r in results if r.ok]
    rates = {r.name: r.metrics["output_tokens_per_second"] for r in ok}
    fractions = {r.name: fraction_of_roofline(r.metrics["elapsed_time"], roofline["seconds"])
                 for r in ok} if roofline else {}
    transition_share = {}
    for r in ok:
        if r.kind == "seesaw" and r.details.get("transition_seconds") is not None:
            transition_share[r.name] = r.details["transition_seconds"] / r.metrics["elapsed_time"]
    return {"roofline": roofline, "fraction_of_roofline": fractions, "ratios": ratio_matrix(rates),
            "transition_share": transition_share,
            "targets": [t.evaluate(rates, fractions) for t in targets],
            "agreement_with_reference": peer_runs.agreement(results, reference), "reference": reference}


def table_rows(results: list[peer_runs.PeerResult], analysis: dict, compare_to: list[str]) -> list[dict]:
    rows = []
    for r in results:
        status = r.status if r.ok else f"{r.status}: {r.reason}".replace("|", "/")
        row = {"peer": r.name, "status": status if len(status) <= 160 else status[:157] + "...", "wall": r.wall_seconds}
        if r.ok:
            row.update(r.metrics)
            row["roofline_pct"] = 100 * analysis["fraction_of_roofline"].get(r.name, float("nan"))
            for other in compare_to:
                row[f"x_{other}"] = analysis["ratios"].get(r.name, {}).get(other)
            row["transitions"] = r.details.get("num_transitions")
            share = analysis["transition_share"].get(r.name)
            row["transition_pct"] = None if share is None else 100 * share
            agree = analysis["agreement_with_reference"].get(r.name)
            row["agree_tokens"] = agree
        rows.append(row)
    return rows


def write_report(run_dir: Path, output_json: Path, results, analysis: dict, workload: Workload,
                 machine_info: dict, settings: dict, command: str) -> dict:
    compare_to = [name for name in ("transformers", "vllm", "vllm_2cores") if name in analysis["ratios"]]
    rows = table_rows(results, analysis, compare_to)
    columns = [("peer", "peer", ""), ("elapsed_time", "elapsed s", ".1f"), ("requests_per_second", "req/s", ".2f"),
               ("tokens_per_second", "total tok/s", ".1f"), ("output_tokens_per_second", "output tok/s", ".1f"),
               ("roofline_pct", "% roofline", ".1f"),
               *[(f"x_{o}", f"x {o}", ".2f") for o in compare_to],
               ("transitions", "transitions", "d"), ("transition_pct", "transition % of time", ".2f"),
               ("agree_tokens", f"tokens = {analysis['reference']} before the first difference (mean)", ".1f"), ("wall", "wall s (with start-up)", ".1f"),
               ("status", "status", "")]
    main_table = markdown_table(rows, columns)
    names = list(analysis["ratios"])
    ratio_rows = [{"peer": a, **{b: analysis["ratios"][a][b] for b in names}} for a in names]
    ratio_table = markdown_table(ratio_rows, [("peer", "output tok/s ratio (row / column)", ""),
                                              *[(b, b, ".2f") for b in names]])
    target_rows = [{**t, "measured_s": "–" if t["measured"] is None else f"{t['measured']:.2f}",
                    "met_s": "n/a" if t["met"] is None else ("met" if t["met"] else "missed"),
                    "margin_s": "–" if t["margin"] is None else f"{100 * t['margin']:+.0f}%"} for t in analysis["targets"]]
    target_table = markdown_table(target_rows, [("target", "target", ""), ("measured_s", "measured", ""),
                                                ("met_s", "", ""), ("margin_s", "by", "")])
    profiles = [f"Profile of {r.name} (py-spy, seconds of each rank's step loop):\n\n"
                f"{profiling.markdown(r.details['profile'])}" for r in results if r.ok and r.details.get("profile")]
    markdown = "\n\n".join([f"Command: `{command}`", main_table, ratio_table, target_table, *profiles]) + "\n"
    (run_dir / "results.md").write_text(markdown)
    document = {"command": command, "machine": machine_info, "workload": workload.summary(),
                "settings": settings, **analysis,
                "peers": {r.name: r.to_json() for r in results}, "table_markdown": main_table}
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(document, indent=2, default=str))
    for r in results:
        if r.ok:
            per_peer = {key: r.metrics[key] for key in THROUGHPUT_KEYS}
            (output_json.parent / f"{r.name}.throughput.json").write_text(json.dumps(per_peer, indent=2))
    plot(run_dir / "throughput.png", results, analysis, workload)
    return document


def plot(path: Path, results, analysis: dict, workload: Workload) -> None:
    """Output tokens/s per peer as bars, the roofline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    if not ok:
        return
    colors = {"seesaw": "tab:purple", "transformers": "tab:gray", "vllm": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = [r.name for r in ok]
    values = [r.metrics["output_tokens_per_second"] for r in ok]
    bars = ax.bar(names, values, color=[colors.get(r.kind, "tab:blue") for r in ok])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                    fontsize=8)
    roofline = analysis.get("roofline")
    if roofline:
        ax.axhline(roofline["output_tokens_per_second"], color="tab:red", linestyle="--", linewidth=1)
        ax.axhline(roofline["output_tokens_per_second"] / 2, color="tab:red", linestyle=":", linewidth=1)
        ax.text(len(ok) - 0.5, roofline["output_tokens_per_second"], "FLOP roofline", color="tab:red",
                ha="right", va="bottom", fontsize=8)
        ax.text(len(ok) - 0.5, roofline["output_tokens_per_second"] / 2, "half roofline", color="tab:red",
                ha="right", va="bottom", fontsize=8)
    summary = workload.summary()
    ax.set_ylabel("output tokens/s")
    span = lambda low, high: f"{low}" if low == high else f"{low}-{high}"
    ax.set_title(f"{summary['num_requests']} prompts of {span(summary['prompt_len_min'], summary['prompt_len_max'])} "
                 f"tokens, {span(summary['output_len_min'], summary['output_len_max'])} output tokens each")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure_machine(enabled: bool, nproc: int, dtype: str = "float32") -> dict:
    if not enabled:
        return {}
    threads = tuple(sorted({1, nproc}))
    return machine.measure(threads, dtype=dtype)


def merge_measures(before: dict, after: dict) -> dict:
    """Both measures, and the best of each figure (the machine's capability when the load was lowest)."""
    if not before:
        return {}
    best = {t: max(before["matmul_gflops"][t], after.get("matmul_gflops", {}).get(t, 0.0))
            for t in before["matmul_gflops"]}
    return {"before": before, "after": after, "matmul_gflops_best": best, "matmul_gflops_cores": cores_gflops(best),
            "memcpy_gbps_best": max(before["memcpy_gbps"], after.get("memcpy_gbps", 0.0))}


def cores_gflops(best: dict[str, float]) -> dict[str, float]:
    """What ``n`` cores can do: the better of ``n`` threads in one matmul and ``n`` times one thread.

    On shared cores a multi-threaded matmul waits for its slowest thread, so it can measure below one
    thread; ``n`` single-threaded ranks (how seesaw_ds uses the cores) are bounded by ``n`` x one thread.
    """
    one = best.get("1", 0.0)
    return {t: max(rate, int(t) * one) for t, rate in best.items()}


def run_benchmark(settings: BenchConfig, run_dir: Path, command: str) -> dict:
    """Everything: returns the results document (also written to disk)."""
    bench = settings.bench
    model_dir = resolve_model(settings)
    workload, max_model_len = build_workload(settings, model_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    workload_json = run_dir / "workload.json"
    workload_json.write_text(json.dumps(workload.to_json()))
    input_jsonl = workload.write_jsonl(run_dir / "input.jsonl", ignore_eos=bench.ignore_eos)
    targets = [parse_target(t) for t in bench.targets]
    summary = workload.summary()
    print(f"[bench] model {model_dir} ({settings.model.dtype}); workload {summary['name']}: {summary['num_requests']} requests, "
          f"{summary['prompt_tokens']} prompt + {summary['output_tokens']} output tokens", flush=True)
    before = measure_machine(bench.measure_machine, bench.nproc, settings.model.dtype)
    if before:
        print(f"[bench] machine: {settings.model.dtype} matmul GFLOP/s {before['matmul_gflops']}, memcpy {before['memcpy_gbps']:.1f} GB/s",
              flush=True)
    results = []
    for name in bench.peers:
        print(f"[bench] {name}: running", flush=True)
        result = run_peer(name, settings, model_dir, run_dir, workload_json, input_jsonl, max_model_len)
        results.append(result)
        if result.ok:
            print(f"[bench] {name}: {throughput_line(result.metrics)} (elapsed {result.metrics['elapsed_time']:.1f} s,"
                  f" wall {result.wall_seconds:.1f} s)", flush=True)
        else:
            print(f"[bench] {name}: {result.status}: {result.reason}", flush=True)
    after = measure_machine(bench.measure_machine, bench.nproc, settings.model.dtype)
    machine_info = {"cpu": machine.cpu_summary(), **merge_measures(before, after)}
    config = json.loads((model_dir / "config.json").read_text())
    analysis = analyse(results, workload, ModelShape.from_hf_config(config), machine_info, bench.nproc, targets,
                       bench.reference)
    analysis["model"] = {"path": str(model_dir), "num_parameters": _num_parameters(model_dir)}
    output_json = Path(bench.output_json) if bench.output_json else run_dir / "results.json"
    document = write_report(run_dir, output_json, results, analysis, workload, machine_info, asdict(settings),
                            command)
    print("\n" + document["table_markdown"], flush=True)
    print(f"\n[bench] results: {output_json}; tables: {run_dir / 'results.md'}; plot: {run_dir / 'throughput.png'}",
          flush=True)
    return document


def _num_parameters(model_dir: Path) -> int | None:
    from seesaw_ds.model.tiny import read_manifest

    manifest = read_manifest(model_dir)
    return manifest.get("num_parameters") if manifest else None


def reanalyse(results_json: Path) -> dict:
    """Redo the analysis, tables and plot of a finished run from its results JSON (no peer runs again).

    The agreement shares are kept from the run (the token prefixes are not stored).
    """
    results_json = Path(results_json)
    document = json.loads(results_json.read_text())
    run_dir = results_json.parent
    workload = Workload.from_json(json.loads((run_dir / "workload.json").read_text()))
    results = [peer_runs.PeerResult(p["name"], p["kind"], p["status"], p.get("reason"),
                                    metrics={k: p[k] for k in THROUGHPUT_KEYS if k in p},
                                    wall_seconds=p.get("wall_seconds", 0.0), details=p.get("details") or {})
               for p in document["peers"].values()]
    machine_info = document["machine"]
    if "matmul_gflops_best" in machine_info:
        machine_info["matmul_gflops_cores"] = cores_gflops(machine_info["matmul_gflops_best"])
    settings = document["settings"]
    bench = settings["bench"]
    model_dir = Path(document["model"]["path"])
    config = json.loads((model_dir / "config.json").read_text())
    analysis = analyse(results, workload, ModelShape.from_hf_config(config), machine_info, bench["nproc"],
                       [parse_target(t) for t in bench["targets"]], bench["reference"])
    analysis["agreement_with_reference"] = document.get("agreement_with_reference", {})
    analysis["model"] = document["model"]
    return write_report(run_dir, results_json, results, analysis, workload, machine_info, settings,
                        document["command"])
