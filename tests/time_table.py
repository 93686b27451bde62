"""The per-file time table of docs/testing.md, from a pytest log run with ``--durations=0``.

    bash tests/run.sh --durations=0 > suite.log 2>&1
    python tests/time_table.py suite.log            # prints the table (markdown)

    SEESAW_TEST_LAUNCH_LOG=launches.tsv bash tests/run.sh --durations=0 > suite.log 2>&1
    python tests/time_table.py suite.log launches.tsv   # the table with each file's launched commands

Each file's time is the sum of its tests' setup, call and teardown (module and session fixtures count
where pytest charges them: to the first test that uses them). tests/run.sh runs the unit tests on two
workers, so their files add up to more than that phase's wall time; the last line gives each phase's wall
time (pytest's own "in N s") and their sum.
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

DURATION = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(tests/[^:\s]+)::")
WALL = re.compile(r"^(?:=+ )?\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b.* in ([\d.]+)s")


def launches(log: str) -> dict[str, tuple[int, float, float]]:
    """test file -> (commands its tests ran, their wall seconds, their CPU seconds), from a
    SEESAW_TEST_LAUNCH_LOG file (tests/helpers.py writes a line per command: seconds, test id, command, CPU)."""
    counts: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for line in log.splitlines():
        seconds, test, _, cpu = line.split("\t")
        entry = counts[test.split("::", 1)[0]]
        entry[0] += 1
        entry[1] += float(seconds)
        entry[2] += float(cpu)
    return {path: (count, seconds, cpu) for path, (count, seconds, cpu) in counts.items()}


def table(log: str, launch_log: str | None = None) -> str:
    launched = launches(launch_log) if launch_log is not None else None
    per_file: dict[str, float] = defaultdict(float)
    tests: dict[str, set[str]] = defaultdict(set)
    for line in log.splitlines():
        match = DURATION.match(line)
        if match:
            seconds, _, path = match.groups()
            per_file[path] += float(seconds)
            tests[path].add(line.split("::", 1)[1].strip())
    walls = [float(m.group(1)) for m in map(WALL.search, log.splitlines()) if m]
    tiers: dict[str, float] = defaultdict(float)
    rows = ["| file | tests that took 5 ms or more | seconds |", "|---|---:|---:|"]
    if launched is not None:
        rows = ["| file | tests that took 5 ms or more | seconds | commands launched | their seconds | their CPU seconds |",
                "|---|---:|---:|---:|---:|---:|"]
    for path, seconds in sorted(per_file.items(), key=lambda item: -item[1]):
        row = f"| `{path}` | {len(tests[path])} | {seconds:.1f} |"
        if launched is not None:
            count, launch_seconds, cpu = launched.get(path, (0, 0.0, 0.0))
            row += f" {count} | {launch_seconds:.1f} | {cpu:.1f} |"
        rows.append(row)
        tiers[path.split("/")[1]] += seconds
    rows.append("")
    rows.append("| tier | seconds (sum of its tests) |")
    rows.append("|---|---:|")
    rows += [f"| {tier} | {seconds:.1f} |" for tier, seconds in sorted(tiers.items(), key=lambda item: -item[1])]
    summaries = [line.strip("= ") for line in log.splitlines() if WALL.search(line)]
    rows.append("")
    if walls:
        phases = " + ".join(f"{wall:.0f} s ({summary})" for wall, summary in zip(walls, summaries))
        rows.append(f"Wall time of pytest: {sum(walls):.0f} s = {phases}.")
    else:
        rows.append("No pytest summary found.")
    return "\n".join(rows)


if __name__ == "__main__":
    text = Path(sys.argv[1]).read_text(errors="replace") if len(sys.argv) > 1 else sys.stdin.read()
    print(table(text, Path(sys.argv[2]).read_text() if len(sys.argv) > 2 else None))
