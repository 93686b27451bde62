"""The command line as a user meets it: a bad configuration is one line on stderr naming the value (exit 2,
no traceback, no rank started), and `launch/run.py -m` runs a sweep, each job its own multi-rank run, with a
summary of all of them in the sweep directory. The one-line refusals start the launcher alone (no rank: no `dist`
mark), so tests/run.sh runs them beside the unit tests, in parallel."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_command

RUN = str(REPO / "launch" / "run.py")
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time in a land", "Seesaw inference is",
           "One two three four five six", "Why is the sky"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"req-{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def pickle_model(tiny_models, tmp_path_factory) -> Path:
    """A checkpoint directory with only pytorch_model.bin (never unpickled: refused before any load)."""
    directory = tmp_path_factory.mktemp("pickle_model")
    shutil.copy(tiny_models["llama"] / "config.json", directory / "config.json")
    (directory / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return directory


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes that contain ``marker`` (a rank would carry the run directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


def bad_cases(model: Path, prompts: Path, pickle_dir: Path, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (overrides, substrings the one error line must contain)."""
    base = [f"model.path={model}", f"io.input={prompts}", f"io.output={tmp / 'out.jsonl'}"]
    return {
        "mistyped key": (base + ["parallel.prefil.pp=2"], ["prefil"]),
        "wrong type": (base + ["launch.nproc=two"], ["launch.nproc", "two"]),
        "unknown preset": (base + ["parallel=pp3"], ["parallel/pp3", "seesaw_pp2_tp2"]),
        "unknown model preset": (base + ["model=llama3_8bb"], ["model/llama3_8bb", "llama3_8b"]),
        "tp not dividing heads": (base + ["parallel.decode.tp=3", "parallel.decode.pp=1", "launch.nproc=3",
                                          "parallel.prefill.pp=3"], ["parallel.decode.tp=3", "heads"]),
        "pp beyond layers": (base + ["parallel.prefill.pp=6", "parallel.decode.tp=1", "parallel.decode.dp=6",
                                     "launch.nproc=6"], ["parallel.prefill.pp=6", "layers"]),
        "ranks not dividing nproc": (base + ["launch.nproc=3"], ["dp*tp*pp=2", "3 ranks"]),
        "rank counts differ": (base + ["parallel.decode.tp=4", "launch.nproc=4"], ["parallel.prefill", "parallel.decode"]),
        "missing model dir": ([f"model.path={tmp / 'no_such_model'}"] + base[1:], ["model.path=", "no_such_model"]),
        "pickle only": ([f"model.path={pickle_dir}"] + base[1:], ["pytorch_model.bin", "save_pretrained"]),
        "bad sampling default": (base + ["sampling.temperature=-1"], ["sampling.temperature"]),
        "bad sampling type": (base + ["sampling.top_p=high"], ["sampling.top_p", "high"]),
        "unwritable output": (base[:2] + ["io.output=/proc/seesaw_ds/out.jsonl"], ["io.output=", "/proc/seesaw_ds"]),
        "missing input": ([base[0], f"io.input={tmp / 'missing.jsonl'}", base[2]], ["io.input=", "missing.jsonl"]),
        "no micro-batches": (base + ["parallel.prefill_micro_batches=0"], ["parallel.prefill_micro_batches=0"]),
        "no prefix window": (base + ["kv.prefix_window_tokens=0"], ["kv.prefix_window_tokens=0"]),
        "unknown dtype": (base + ["model.dtype=float8"], ["model.dtype='float8'", "bfloat16"]),
    }


CASE_NAMES = ["mistyped key", "wrong type", "unknown preset", "unknown model preset", "tp not dividing heads",
              "pp beyond layers", "ranks not dividing nproc", "rank counts differ", "missing model dir", "pickle only",
              "bad sampling default", "bad sampling type", "unwritable output", "missing input", "no micro-batches",
              "no prefix window", "unknown dtype"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_config_is_one_line(case, tiny_models, prompts_file, pickle_model, tmp_path):
    overrides, expected = bad_cases(tiny_models["llama"], prompts_file, pickle_model, tmp_path)[case]
    marker = str(tmp_path / "run")
    proc = run_command([sys.executable, RUN, *overrides, f"+run_dir={marker}"], timeout=300, check=False,
                       cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith("seesaw_ds: error: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not processes_mentioning(marker), "no rank may be left running"
    assert not (tmp_path / "run").exists(), "a configuration error is found before any rank starts"


def test_bad_sweep_job_is_one_line_before_any_job_runs(tiny_models, prompts_file, tmp_path):
    """A sweep checks every job first: the third job's bad layout stops the sweep before the first runs."""
    sweep = tmp_path / "sweep"
    proc = run_command([sys.executable, RUN, "-m", "parallel=tp2,pp2,tp4", f"model.path={tiny_models['llama']}",
                        f"io.input={prompts_file}", f"hydra.sweep.dir={sweep}"], timeout=300, check=False,
                       cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("seesaw_ds: error: sweep job 2 (parallel=tp4)"), proc.stderr
    assert "dp*tp*pp=4" in lines[0]
    assert not list(sweep.glob("*/outputs.jsonl")), "no job may run"


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_command([sys.executable, RUN, "--cfg", "job", "model=qwen2_7b", "sampling=greedy", "kv=small",
                        "scheduler=prefill_first"], timeout=300, cwd=tmp_path)
    assert "/Qwen2-7B-Instruct" in proc.stdout and "dtype: bfloat16" in proc.stdout, proc.stdout
    assert "temperature: 0" in proc.stdout and "policy: prefill_first" in proc.stdout, proc.stdout
    assert "host_tokens: 80" in proc.stdout, proc.stdout


@pytest.mark.dist
def test_local_multirun_writes_a_summary_of_every_job(tiny_models, prompts_file, tmp_path):
    sweep = tmp_path / "sweep"
    layouts = ["tp2", "pp2", "seesaw_pp2_tp2"]
    common = [f"model.path={tiny_models['llama']}", f"io.input={prompts_file}", "sampling.max_tokens=4",
              "sampling.temperature=0", "sampling.ignore_eos=true"]
    proc = run_command([sys.executable, RUN, "-m", f"parallel={','.join(layouts)}", *common,
                        f"hydra.sweep.dir={sweep}"], timeout=900, cwd=tmp_path)
    jobs = [sweep / str(number) for number in range(len(layouts))]
    outputs = []
    for job, layout in zip(jobs, layouts):
        saved = (job / "overrides.txt").read_text().splitlines()  # as Hydra's sweeper spells them (true -> True)
        assert saved[0] == f"parallel={layout}" and [o.split("=")[0] for o in saved[1:]] == \
            [o.split("=")[0] for o in common], saved
        records = [json.loads(line) for line in (job / "outputs.jsonl").read_text().splitlines()]
        assert sorted(r["custom_id"] for r in records) == [f"req-{i}" for i in range(len(PROMPTS))]
        outputs.append({r["custom_id"]: r["token_ids"] for r in records})
    assert outputs[0] == outputs[1] == outputs[2], "greedy tokens do not depend on the layout"
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["overrides"] for row in rows] == [f"parallel={layout}" for layout in layouts]
    assert [row["layouts"] for row in rows] == ["tp2->tp2", "pp2->pp2", "pp2->tp2"]
    for row in rows:
        assert row["status"] == "ok" and row["requests"] == str(len(PROMPTS)), row
        assert float(row["output_tok_s"]) > 0 and int(row["transitions"]) >= 1, row
    table = (sweep / "summary.md").read_text()
    for layout in layouts:
        assert f"| parallel={layout} |" in table, table
    assert (sweep / "summary.png").stat().st_size > 0
    assert "summary.md" in proc.stdout


@pytest.fixture(scope="module")
def unsupported_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from tiny_families import make_unsupported_checkpoint

    root = tmp_path_factory.mktemp("unsupported")
    models = {kind: make_unsupported_checkpoint(kind, root / kind) for kind in ("gpt2", "gemma3_multimodal",
                                                                               "rope_unhandled")}
    # a supported family whose config does not match its weights: found from metadata, before any weight
    mismatch = root / "mismatch"
    shutil.copytree(tiny_models["llama"], mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] = 96
    (mismatch / "config.json").write_text(json.dumps(config))
    models["mismatch"] = mismatch
    return models


@pytest.mark.parametrize("kind, expected", [
    ("gpt2", ["model_type 'gpt2' is not supported", "Llama 2/3.x (llama)", "Granite (granite)"]),
    ("gemma3_multimodal", ["'gemma3'", "Gemma3ForConditionalGeneration", "gemma3_text"]),
    ("rope_unhandled", ["rope_type 'proportional'", "handled rope types"]),
    ("mismatch", ["mlp.gate_proj.weight has shape", "does not match its config.json"]),
])
def test_unsupported_checkpoint_is_refused_before_any_weight_is_read(kind, expected, unsupported_models,
                                                                     prompts_file, tmp_path):
    """One line naming what is unsupported (and the supported families), exit 2, no traceback, no rank."""
    import time

    marker = str(tmp_path / "run")
    started = time.monotonic()
    proc = run_command([sys.executable, RUN, f"model.path={unsupported_models[kind]}", f"io.input={prompts_file}",
                        f"+run_dir={marker}"], timeout=300, check=False, cwd=tmp_path)
    elapsed = time.monotonic() - started
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("seesaw_ds: error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", "nothing else is printed (the checks run before DeepSpeed is imported)"
    assert not processes_mentioning(marker) and not (tmp_path / "run").exists()
    assert elapsed < 60, f"refusal took {elapsed:.0f}s"


@pytest.mark.dist
@pytest.mark.parametrize("bind", ["cores", "none"])
def test_ranks_are_bound_to_cores_of_their_own_by_default(bind, tiny_models, prompts_file, tmp_path):
    """launch.bind=cores (the default): mpiexec gives each rank its own cores, and each runs that many threads;
    launch.bind=none leaves every rank free to run anywhere. The job's metrics say where each rank ran."""
    cpus = sorted(os.sched_getaffinity(0))
    if bind == "cores" and len(cpus) < 2:
        pytest.skip("binding two ranks needs two CPUs")
    metrics = tmp_path / "metrics.json"
    overrides = [f"model.path={tiny_models['llama']}", f"io.input={prompts_file}",
                 f"io.output={tmp_path / 'out.jsonl'}", f"io.metrics={metrics}", "parallel=tp2", "sampling.max_tokens=2", "launch.nproc=2"]
    run_command([sys.executable, RUN, *overrides] + ([] if bind == "cores" else ["launch.bind=none"]),
                timeout=600, cwd=tmp_path)
    ranks = json.loads(metrics.read_text())["ranks"]
    assert len(ranks) == 2
    if bind == "cores":
        first, second = (set(rank["cpus"]) for rank in ranks)
        assert first and second and not first & second, ranks
        assert all(rank["threads"] == len(rank["cpus"]) for rank in ranks), ranks
    else:
        assert all(rank["cpus"] == cpus for rank in ranks), ranks
        assert all(rank["threads"] == max(1, len(cpus) // 2) for rank in ranks), ranks


def test_unknown_bind_is_one_line(tiny_models, prompts_file, tmp_path):
    proc = run_command([sys.executable, RUN, f"model.path={tiny_models['llama']}", f"io.input={prompts_file}",
                        "launch.bind=socket"], timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "launch.bind='socket'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
