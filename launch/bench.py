"""seesaw_ds throughput benchmark against its peers on this machine (Hydra app, conf/bench/).

    python launch/bench.py                                   the standard run (conf/bench/config.yaml)
    python launch/bench.py --peers seesaw,transformers --num-prompts 16
    python launch/bench.py workload=sharegpt_like bench.peers=[seesaw,tp2]
    python launch/bench.py workload=prefill_only             issue 22's presets beside the standard run: 1 output
    python launch/bench.py workload=decode_only              token; prompts cut to 16 tokens, 256 out; one
    python launch/bench.py workload=batch1                   prompt, 256 out (seesaw_auto vs vllm_2cores)
    python launch/bench.py --dataset-path prompts.jsonl --output-json out.json
    python launch/bench.py --reanalyse runs/bench/.../results.json   tables and plot again, no peer runs

Shaped like ``vllm bench throughput``: every peer runs the same token-id prompts with exactly the same
number of output tokens (ignore_eos), one after another on the same cores, and prints
``Throughput: X requests/s, Y total tokens/s, Z output tokens/s``. The results JSON carries the keys of
``vllm bench throughput`` per peer, the machine's measured matmul GFLOP/s and memcpy GB/s, each peer's
fraction of the workload's FLOP roofline and every peer-to-peer ratio. Exit codes: 0 done (a peer that
could not run is reported, not fatal), 2 bad configuration.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from seesaw_ds.bench.cli import translate  # noqa: E402
from seesaw_ds.bench.config import register, to_settings  # noqa: E402

COMMAND = "python launch/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@hydra.main(config_path=str(REPO / "conf" / "bench"), config_name="config", version_base=None)
def main(cfg) -> None:
    from seesaw_ds.bench.runner import run_benchmark

    try:
        settings = to_settings(cfg)
    except Exception as error:  # noqa: BLE001 - OmegaConf raises many types; all are config errors
        print(f"bench: error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    try:
        run_benchmark(settings, Path(HydraConfig.get().runtime.output_dir), COMMAND.strip())
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reanalyse":
        from seesaw_ds.bench.runner import reanalyse

        print(reanalyse(Path(sys.argv[2]))["table_markdown"])
        sys.exit(0)
    register()
    try:
        sys.argv = [sys.argv[0], *translate(sys.argv[1:])]
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
