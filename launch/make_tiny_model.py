"""Command line for building the project's tiny deterministic checkpoints (``seesaw_ds.model.tiny``).

Examples::

    python launch/make_tiny_model.py /tmp/tiny-llama                       # the default model
    python launch/make_tiny_model.py /tmp/tiny-qwen2 --family qwen2 --layers 5
    python launch/make_tiny_model.py /tmp/bench --preset benchmark --check  # the 24M benchmark model
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from seesaw_ds.model.tiny import BENCHMARK_MODEL_KWARGS, FAMILIES, greedy_top2_gaps, make_tiny_model, read_manifest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHECK_PROMPTS = (
    "The morning was cold and bright.",
    "How does a plant grow?",
    "Once upon a time, a small fox",
    "Please list the days of the week.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; options left unset keep ``make_tiny_model``'s (or the preset's) defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the checkpoint into (created if missing)")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--preset", choices=("default", "benchmark"), default="default",
                        help="'benchmark': 8 layers, hidden 512, 8 heads, 4 KV heads, intermediate 1376, "
                             "2048 positions (explicit options override it)")
    parser.add_argument("--layers", type=int, dest="num_layers")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--heads", type=int, dest="num_heads")
    parser.add_argument("--kv-heads", type=int, dest="num_kv_heads")
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--vocab-size", type=int, help="pad the vocabulary beyond the tokenizer's size")
    parser.add_argument("--max-positions", type=int, dest="max_position_embeddings")
    parser.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="default: untied for llama and mistral, tied for qwen2")
    parser.add_argument("--sliding-window", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--check", action="store_true",
                        help="greedy-generate 32 tokens from a few prompts and report the minimum top-2 logit gap")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoint, print its manifest (and the --check result) as JSON."""
    args = parse_args(argv)
    kwargs = dict(BENCHMARK_MODEL_KWARGS) if args.preset == "benchmark" else {}
    for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "tie_word_embeddings", "sliding_window"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    try:
        out = make_tiny_model(args.out_dir, args.family, seed=args.seed, dtype=_DTYPES[args.dtype], **kwargs)
    except ValueError as err:
        print(f"make_tiny_model: {err}", file=sys.stderr)
        return 2
    report = {"path": str(out), **(read_manifest(out) or {})}
    if args.check:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
        min_gap, outputs = greedy_top2_gaps(model, tokenizer, _CHECK_PROMPTS)
        report["check"] = {"min_top2_gap_fp32": min_gap, "distinct_outputs": len({tuple(o) for o in outputs}),
                           "num_prompts": len(outputs)}
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
