"""`parallel=auto` as a user meets it: the launcher calibrates, plans, prints one line, records the choice in
the run directory, and the ranks answer exactly what a fixed-layout run answers (greedy); a world size with
no runnable layout is one line and exit 2 before any rank starts."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, run_command

pytestmark = pytest.mark.dist
RUN = str(REPO / "launch" / "run.py")
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time in a land", "Seesaw inference is"]


def test_auto_chooses_records_and_matches_a_fixed_layout(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    common = [f"model.path={tiny_models['llama']}", f"io.input={prompts}", "sampling=greedy",
              "sampling.max_tokens=8", "launch.nproc=2"]
    auto = run_command([sys.executable, RUN, "parallel=auto", *common, f"io.output={tmp_path / 'auto.jsonl'}",
                        f"+run_dir={tmp_path / 'auto'}"], timeout=240)
    assert "parallel=auto chose" in auto.stdout and "predicted" in auto.stdout
    plan = json.loads((tmp_path / "auto" / "plan.json").read_text())
    ranks = plan["launch.nproc"] or 2  # fewer ranks (each with more threads) where the plan predicts it faster
    assert ranks in (1, 2) and f"launch.nproc={ranks}" in plan["rank_overrides"]
    for phase in ("prefill", "decode"):
        layout = plan[phase]
        assert layout["dp"] * layout["tp"] * layout["pp"] == ranks
        assert f"parallel.{phase}.tp={layout['tp']}" in plan["rank_overrides"]
    assert plan["predicted_tokens_per_second"] > 0 and plan["hardware"]["matmul_flops"] > 0
    assert not any(o.startswith("parallel=") for o in plan["rank_overrides"])
    fixed = run_command([sys.executable, RUN, "parallel=seesaw_pp2_tp2", *common,
                         f"io.output={tmp_path / 'fixed.jsonl'}", f"+run_dir={tmp_path / 'fixed'}"], timeout=240)
    assert fixed.returncode == 0

    def answers(name: str) -> dict:
        lines = (tmp_path / name).read_text().splitlines()
        return {r["custom_id"]: r["token_ids"] for r in map(json.loads, lines)}
    assert answers("auto.jsonl") == answers("fixed.jsonl") and len(answers("auto.jsonl")) == len(PROMPTS)


def test_auto_without_a_runnable_layout_is_one_line(tiny_models, tmp_path):
    proc = run_command([sys.executable, RUN, "parallel=auto", "parallel.prefill.tp=3", "launch.nproc=3",
                        f"model.path={tiny_models['llama']}", f"+run_dir={tmp_path / 'bad'}"], timeout=120,
                       check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "parallel=auto found no layout of 3 rank(s)" in lines[0], proc.stderr
