"""Benchmark workloads: seeded prompts as token-id lists and their exact output lengths (pure, no torch).

Every peer of a benchmark run gets the same :class:`Workload`: the prompts are token ids drawn from the
model's vocabulary (never its special tokens), so no tokenizer can make them differ, and every request
generates exactly its ``output_len`` tokens (``ignore_eos``), so every peer does the same work.

The lengths come from ``seesaw_ds/sim/workload.py``, the one home of synthetic request lengths (their
distributions and seeding); this module puts token ids or real text of those lengths around them.

Presets (the names of ``vllm bench throughput --dataset-name`` where one exists):

- ``random``: input and output lengths uniform in ``[min, max]`` (the standard workload: inputs 20–500,
  outputs 128);
- ``sharegpt_like``: chat-like lengths, log-normal around a median of ~180 prompt and ~200 output tokens with a
  long tail (the shape of ShareGPT conversations, which the Seesaw paper also uses);
- ``arxiv_like``: summarisation-like lengths, long prompts (log-normal around ~1,200 tokens, capped by the
  model's context) and short outputs (~180 tokens): the prefill-heavy end of the Seesaw paper's workloads;
- ``shared_prefix``: issue 15's prefix-sharing workload: one long system message of real text (``prefix_len``
  templated tokens: a shared instruction block, as batch jobs repeat) before each prompt's own short user
  passage (``input_len`` more tokens), in the model's chat template; short outputs (vLLM's prefix-caching
  benchmark uses 10);
- ``jsonl``: a file of ``{"prompt_token_ids": [...] | "prompt": "...", "max_tokens"|"output_len": N}`` lines.

Any preset's prompts can be cut to their last ``prompt_tail`` tokens (:func:`cut_prompts`): the decode-only
preset (conf/bench/workload/decode_only.yaml) keeps 16 tokens of each chat prompt, so that the run is all decode.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from seesaw_ds.sim import workload as sim_workload
from seesaw_ds.sim.workload import ARXIV_LIKE, SHAREGPT_LIKE, LengthDistribution, fitted_lengths, uniform_lengths

PRESETS = ("random", "sharegpt_like", "arxiv_like", "chat", "shared_prefix", "jsonl")
#: The chat preset's instructions, one drawn per prompt before its passage.
CHAT_INSTRUCTIONS = ("Summarize the following text in a few sentences.", "What is the main idea of this passage?",
                     "Rewrite this passage in simpler words.", "List the people and places this text mentions.",
                     "Write three questions a reader could answer from this text.",
                     "Continue this story for another paragraph.")


@dataclass
class Workload:
    """What every peer runs: one prompt (token ids) and one exact output length per request."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.output_lens):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.output_lens)} output lengths")
        if any(not p for p in self.prompts):
            raise ValueError("every prompt needs at least one token")
        if any(n < 1 for n in self.output_lens):
            raise ValueError("every output length must be >= 1")

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    def lengths(self) -> sim_workload.Workload:
        """The requests' token counts, as the planner and the simulator take them."""
        return sim_workload.Workload(self.name, np.array(self.prompt_lens, dtype=np.int64),
                                np.array(self.output_lens, dtype=np.int64))

    def summary(self) -> dict:
        """Counts and length ranges, for the report."""
        prompt, output = self.prompt_lens, self.output_lens
        return {"name": self.name, "num_requests": self.num_requests, "prompt_tokens": sum(prompt),
                "output_tokens": sum(output), "prompt_len_min": min(prompt), "prompt_len_max": max(prompt),
                "prompt_len_mean": sum(prompt) / len(prompt), "output_len_min": min(output),
                "output_len_max": max(output)}

    def request_lines(self, *, ignore_eos: bool = True) -> Iterable[dict]:
        """The workload as seesaw_ds input lines (greedy, exact output lengths)."""
        for index, (prompt, output_len) in enumerate(zip(self.prompts, self.output_lens)):
            line = {"custom_id": f"bench-{index}", "prompt_token_ids": prompt, "max_tokens": output_len,
                    "temperature": 0.0}
            if ignore_eos:
                line["ignore_eos"] = True
            yield line

    def write_jsonl(self, path: Path, *, ignore_eos: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            for line in self.request_lines(ignore_eos=ignore_eos):
                handle.write(json.dumps(line) + "\n")
        return path

    def to_json(self) -> dict:
        return {"name": self.name, "prompts": self.prompts, "output_lens": self.output_lens}

    @classmethod
    def from_json(cls, data: dict) -> "Workload":
        return cls(data["name"], [list(p) for p in data["prompts"]], list(data["output_lens"]))


def _token_ids(rng: random.Random, length: int, token_range: tuple[int, int]) -> list[int]:
    low, high = token_range
    return [rng.randrange(low, high) for _ in range(length)]


def _check_common(num_prompts: int, token_range: tuple[int, int], max_model_len: int) -> None:
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1")
    low, high = token_range
    if not 0 <= low < high:
        raise ValueError(f"token id range {token_range} is empty; need 0 <= low < high")
    if max_model_len < 2:
        raise ValueError(f"max_model_len={max_model_len} leaves no room for a prompt and an output")


def random_workload(num_prompts: int, *, input_len: tuple[int, int], output_len: tuple[int, int],
                    token_range: tuple[int, int], max_model_len: int, seed: int = 0) -> Workload:
    """Input and output lengths uniform in their inclusive ranges; prompt tokens uniform in ``token_range``."""
    _check_common(num_prompts, token_range, max_model_len)
    for label, (low, high) in (("input_len", input_len), ("output_len", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"{label} range [{low}, {high}] must satisfy 1 <= min <= max")
    if input_len[1] + output_len[1] > max_model_len:
        raise ValueError(f"input_len max {input_len[1]} + output_len max {output_len[1]} exceed the model's "
                         f"{max_model_len} positions; lower one of them")
    rng = random.Random(seed)
    drawn = list(islice(uniform_lengths(rng, input_len, output_len), num_prompts))
    prompts = [_token_ids(rng, n, token_range) for n, _ in drawn]
    return Workload("random", prompts, [m for _, m in drawn])


def distribution_workload(name: str, num_prompts: int, *, input_dist: LengthDistribution,
                          output_dist: LengthDistribution, token_range: tuple[int, int], max_model_len: int,
                          seed: int = 0) -> Workload:
    """Lengths drawn from log-normal distributions; the prompt is cut so prompt + output fit the model."""
    _check_common(num_prompts, token_range, max_model_len)
    rng = random.Random(seed)
    prompts, outputs = [], []
    for prompt_len, output_len in islice(fitted_lengths(rng, input_dist, output_dist, max_model_len), num_prompts):
        prompts.append(_token_ids(rng, prompt_len, token_range))
        outputs.append(output_len)
    return Workload(name, prompts, outputs)


def jsonl_workload(path: Path, *, num_prompts: int | None, default_output_len: int, max_model_len: int,
                   tokenize: Callable[[str], list[int]] | None = None) -> Workload:
    """Requests from a JSONL file (the first ``num_prompts`` lines; None = all)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"workload file {str(path)!r} does not exist; give a JSONL file of prompts")
    prompts, outputs = [], []
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if num_prompts is not None and len(prompts) >= num_prompts:
                break
            record = json.loads(line)
            if "prompt_token_ids" in record:
                prompt = [int(t) for t in record["prompt_token_ids"]]
            elif "prompt" in record and tokenize is not None:
                prompt = tokenize(record["prompt"])
            else:
                raise ValueError(f"{path}:{line_no}: needs prompt_token_ids (or prompt, with a tokenizer)")
            output_len = int(record.get("output_len", record.get("max_tokens", default_output_len)))
            if len(prompt) + output_len > max_model_len:
                raise ValueError(f"{path}:{line_no}: {len(prompt)} prompt + {output_len} output tokens exceed the "
                                 f"model's {max_model_len} positions")
            prompts.append(prompt)
            outputs.append(output_len)
    if not prompts:
        raise ValueError(f"workload file {str(path)!r} has no requests")
    return Workload(path.stem, prompts, outputs)


def _sentences(corpus: str) -> list[str]:
    sentences = [part.strip() + "." for part in corpus.replace("\n", " ").split(".") if part.strip()]
    if not sentences:
        raise ValueError("the workload's corpus has no sentences")
    return sentences


def _grow(render: Callable[[list[str]], int], sentences: list[str], start: int, target: int) -> list[str]:
    """Words of the corpus from sentence ``start`` on, as many as make ``render(words)`` reach ``target``
    tokens (the last sentence trimmed word by word to land on it)."""
    words: list[str] = []
    index = start
    while render(words) < target:
        words.extend(sentences[index % len(sentences)].split())
        index += 1
    while len(words) > 1 and render(words[:-1]) >= target:
        words.pop()
    return words


def chat_workload(num_prompts: int, *, input_len: tuple[int, int], output_len: tuple[int, int],
                  apply_chat_template: Callable[[list[dict]], list[int]], corpus: str, max_model_len: int,
                  seed: int = 0) -> Workload:
    """Chat prompts of real text: an instruction and a corpus passage (cycling through the corpus from a drawn
    sentence) in the model's chat template, of a templated length uniform in ``input_len`` (the passage is
    grown a sentence at a time and the last sentence trimmed word by word to land on it)."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1")
    if input_len[1] + output_len[1] > max_model_len:
        raise ValueError(f"input_len max {input_len[1]} + output_len max {output_len[1]} exceed the model's "
                         f"{max_model_len} positions; lower one of them")
    sentences = _sentences(corpus)
    rng = random.Random(seed)
    prompts, outputs = [], []
    for target, out_len in islice(uniform_lengths(rng, input_len, output_len), num_prompts):
        instruction, start = rng.choice(CHAT_INSTRUCTIONS), rng.randrange(len(sentences))
        render = lambda words: apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{' '.join(words)}"}])
        words = _grow(lambda words: len(render(words)), sentences, start, target)
        prompts.append(render(words))
        outputs.append(out_len)
    return Workload("chat", prompts, outputs)


def shared_prefix_workload(num_prompts: int, *, prefix_len: int, input_len: tuple[int, int],
                           output_len: tuple[int, int], apply_chat_template: Callable[[list[dict]], list[int]],
                           corpus: str, max_model_len: int, seed: int = 0) -> Workload:
    """One system message of ``prefix_len`` templated tokens of real text shared by every prompt, then each
    prompt's user passage (from a drawn sentence of the corpus) of ``input_len`` more tokens."""
    if num_prompts < 1 or prefix_len < 1:
        raise ValueError(f"num_prompts={num_prompts} and prefix_len={prefix_len} must be >= 1")
    if prefix_len + input_len[1] + output_len[1] > max_model_len:
        raise ValueError(f"prefix_len {prefix_len} + input_len max {input_len[1]} + output_len max {output_len[1]} "
                         f"exceed the model's {max_model_len} positions; lower one of them")
    sentences = _sentences(corpus)
    instruction = "You extract facts. Read the reference text below, then answer the user's question in one line."
    system_words = _grow(lambda words: len(apply_chat_template(
        [{"role": "system", "content": f"{instruction}\n\n{' '.join(words)}"}])), sentences, 0, prefix_len)
    system = {"role": "system", "content": f"{instruction}\n\n{' '.join(system_words)}"}
    base = len(apply_chat_template([system]))
    rng = random.Random(seed)
    prompts, outputs = [], []
    for target, out_len in islice(uniform_lengths(rng, input_len, output_len), num_prompts):
        render = lambda words: apply_chat_template([system, {"role": "user", "content": " ".join(words)}])
        words = _grow(lambda words: len(render(words)) - base, sentences, rng.randrange(len(sentences)), target)
        prompts.append(render(words))
        outputs.append(out_len)
    return Workload("shared_prefix", prompts, outputs)


def cut_prompts(workload: Workload, keep_last: int) -> Workload:
    """``workload`` with every prompt cut to its last ``keep_last`` tokens (a shorter one kept whole). The last
    tokens, not the first: a chat prompt's first ones are the template's system header, the same in every
    prompt, while its last ones are its own text and the assistant header the answer follows."""
    if keep_last < 1:
        raise ValueError(f"workload.prompt_tail={keep_last} must be >= 1 (or null: prompts whole)")
    return Workload(f"{workload.name}_last{keep_last}", [p[-keep_last:] for p in workload.prompts],
                    list(workload.output_lens))


def make_workload(kind: str, *, num_prompts: int, seed: int, token_range: tuple[int, int], max_model_len: int,
                  input_len: tuple[int, int] = (20, 500), output_len: tuple[int, int] = (128, 128),
                  path: str | None = None, tokenize=None, apply_chat_template=None, corpus: str | None = None,
                  prefix_len: int = 1000, prompt_tail: int | None = None) -> Workload:
    """The workload of preset ``kind`` (one of :data:`PRESETS`), its prompts cut to their last ``prompt_tail``
    tokens when that is given (:func:`cut_prompts`)."""
    workload = _make_workload(kind, num_prompts=num_prompts, seed=seed, token_range=token_range,
                              max_model_len=max_model_len, input_len=input_len, output_len=output_len, path=path,
                              tokenize=tokenize, apply_chat_template=apply_chat_template, corpus=corpus,
                              prefix_len=prefix_len)
    return workload if prompt_tail is None else cut_prompts(workload, prompt_tail)


def _make_workload(kind: str, *, num_prompts: int, seed: int, token_range: tuple[int, int], max_model_len: int,
                   input_len: tuple[int, int], output_len: tuple[int, int], path: str | None, tokenize,
                   apply_chat_template, corpus: str | None, prefix_len: int) -> Workload:
    if kind == "shared_prefix":
        if apply_chat_template is None or corpus is None:
            raise ValueError("workload.kind=shared_prefix needs a tokenizer with a chat template and a corpus")
        return shared_prefix_workload(num_prompts, prefix_len=prefix_len, input_len=input_len, output_len=output_len,
                                      apply_chat_template=apply_chat_template, corpus=corpus,
                                      max_model_len=max_model_len, seed=seed)
    if kind == "chat":
        if apply_chat_template is None or corpus is None:
            raise ValueError("workload.kind=chat needs a tokenizer with a chat template and a corpus")
        return chat_workload(num_prompts, input_len=input_len, output_len=output_len,
                             apply_chat_template=apply_chat_template, corpus=corpus, max_model_len=max_model_len,
                             seed=seed)
    if kind == "random":
        return random_workload(num_prompts, input_len=input_len, output_len=output_len, token_range=token_range,
                               max_model_len=max_model_len, seed=seed)
    if kind in ("sharegpt_like", "arxiv_like"):
        input_dist, output_dist = SHAREGPT_LIKE if kind == "sharegpt_like" else ARXIV_LIKE
        return distribution_workload(kind, num_prompts, input_dist=input_dist, output_dist=output_dist,
                                     token_range=token_range, max_model_len=max_model_len, seed=seed)
    if kind == "jsonl":
        if not path:
            raise ValueError("workload.kind=jsonl needs workload.path=<file.jsonl>")
        return jsonl_workload(Path(path), num_prompts=num_prompts, default_output_len=output_len[1],
                              max_model_len=max_model_len, tokenize=tokenize)
    raise ValueError(f"unknown workload.kind={kind!r}; expected one of {PRESETS}")


def token_id_range(vocab_size: int, special_ids: Iterable[int]) -> tuple[int, int]:
    """The longest run ``[low, high)`` of ids below ``vocab_size`` holding no special token: prompts drawn
    from it can never contain eos, bos or padding, whatever the tokenizer puts where."""
    specials = sorted({i for i in special_ids if 0 <= i < vocab_size})
    best, start = (0, 0), 0
    for cut in specials + [vocab_size]:
        if cut - start > best[1] - best[0]:
            best = (start, cut)
        start = cut + 1
    if best[1] - best[0] < 1:
        raise ValueError(f"no ordinary token ids below {vocab_size}: every id is special")
    return best
