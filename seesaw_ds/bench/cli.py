"""``vllm bench throughput``-style flags for launch/bench.py, turned into the app's Hydra overrides (pure).

    --peers seesaw,vllm      bench.peers=[seesaw,vllm]
    --num-prompts 64         bench.num_prompts=64
    --dataset-name NAME      workload=NAME (random | sharegpt_like | arxiv_like | jsonl | standard)
    --dataset-path FILE      workload=jsonl workload.path=FILE
    --input-len N            workload.input_len_min=N workload.input_len_max=N
    --output-len N           workload.output_len_min=N workload.output_len_max=N
    --seed N                 bench.seed=N
    --output-json FILE       bench.output_json=FILE
    --model DIR              model.path=DIR

Anything else is passed to Hydra as it is (``key=value`` overrides, ``-m``, ``--help``...).
"""
from __future__ import annotations

FLAGS = ("--peers", "--num-prompts", "--dataset-name", "--dataset-path", "--input-len", "--output-len", "--seed",
         "--output-json", "--model")


def _expand(flag: str, value: str) -> list[str]:
    if flag == "--peers":
        names = [name.strip() for name in value.strip("[]").split(",") if name.strip()]
        return [f"bench.peers=[{','.join(names)}]"]
    if flag == "--num-prompts":
        return [f"bench.num_prompts={value}"]
    if flag == "--dataset-name":
        return [f"workload={value}"]
    if flag == "--dataset-path":
        return ["workload=jsonl", f"workload.path={value}"]
    if flag == "--input-len":
        return [f"workload.input_len_min={value}", f"workload.input_len_max={value}"]
    if flag == "--output-len":
        return [f"workload.output_len_min={value}", f"workload.output_len_max={value}"]
    if flag == "--seed":
        return [f"bench.seed={value}"]
    if flag == "--output-json":
        return [f"bench.output_json={value}"]
    return [f"model.path={value}"]


def translate(argv: list[str]) -> list[str]:
    """Replace the flags above (``--flag value`` or ``--flag=value``) by Hydra overrides, in place."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        flag, eq, inline = arg.partition("=")
        if flag in FLAGS:
            if eq:
                value = inline
            elif index + 1 < len(argv):
                index += 1
                value = argv[index]
            else:
                raise ValueError(f"{flag} needs a value")
            expanded = _expand(flag, value)
            # A dataset flag picks the config group: it must precede the group's keys.
            if flag in ("--dataset-name", "--dataset-path"):
                out = [o for o in out if not o.startswith("workload=")]
                out[0:0] = expanded
            else:
                out.extend(expanded)
        else:
            out.append(arg)
        index += 1
    return out
