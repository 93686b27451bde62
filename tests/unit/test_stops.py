"""The incremental detokenizer and stop checker (seesaw_ds/engine/stops.py) give exactly the text, finish reason
and stop reason of the checker before issue 22 (tests/stop_reference.py: two Python-side decodes per token), token by
token: on real text, on stop strings that span tokens, on multi-byte characters split over tokens (held back
until whole; cut by max_tokens they flush as U+FFFD), on byte-fallback pieces (a SentencePiece-style tokenizer)
and on random ids with special tokens among them; with min_tokens, eos and stop token ids."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from seesaw_ds.engine.params import SamplingParams
from seesaw_ds.engine.stops import Detokenizer, StopChecker
from stop_reference import ReferenceStopChecker

#: Where SmolLM2 is converted: the test suite's cache (tests/conftest.py smollm2) or the user's ($SEESAW_CACHE).
SMOLLM2_DIRS = [Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct",
                Path(os.environ.get("SEESAW_CACHE", Path.home() / ".cache" / "seesaw_ds")) / "models"
                / "SmolLM2-135M-Instruct"]
TEXTS = ["The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
         "striking thirteen.\n\nSTOP here: ### and then more text follows.",
         "Überraschung! Les élèves ont mangé des crêpes. 東京は日本の首都です。 Emoji: 🙂🚀👩‍👩‍👧 done.",
         "def f(x):\n    return x ** 2  # squares\n\n\tTabs\tand  double  spaces  ..."]


def _byte_fallback_tokenizer():
    """A tiny Llama-2-style tokenizer: SentencePiece BPE with byte fallback (<0xE2> pieces for characters
    outside its vocabulary) and Llama-2's decoder (▁ -> space, bytes fused, the first space stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: F401
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?:#'") - {" "})
    words = ["▁", "▁t", "▁th", "▁the", "he", "in", "▁a", "er", "on", "▁s", "st", "▁st", "op"]
    vocab = {piece: i for i, piece in enumerate(pieces + letters + words)}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("i", "n"), ("▁", "a"), ("e", "r"), ("o", "n"),
              ("▁", "s"), ("s", "t"), ("▁s", "t"), ("o", "p")]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["tiny", "smollm2", "byte_fallback"])
def tokenizer(request, engine_tokenizer):
    if request.param == "tiny":
        return engine_tokenizer
    if request.param == "byte_fallback":
        return _byte_fallback_tokenizer()
    found = [path for path in SMOLLM2_DIRS if (path / "tokenizer.json").is_file()]
    if not found:
        pytest.skip("SmolLM2's tokenizer is not converted on this machine (python launch/fetch_model.py)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(found[0])


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _streams(tokenizer, seed: int = 0) -> list[list[int]]:
    """Token streams: real text, the same with eos and other specials dropped in, random ids of every kind."""
    rng = random.Random(seed)
    real = [_ids(tokenizer, text) for text in TEXTS]
    specials = list(tokenizer.all_special_ids)
    mixed = []
    for ids in real:
        ids = list(ids)
        for _ in range(3):
            ids.insert(rng.randrange(len(ids)), rng.choice(specials))
        mixed.append(ids)
    vocab = len(tokenizer)
    noise = [[rng.randrange(vocab) for _ in range(rng.randint(1, 120))] for _ in range(12)]
    return real + mixed + noise


def _assert_same(params: SamplingParams, tokenizer, stream: list[int], prompt: list[int], eos: list[int]) -> None:
    new = StopChecker(tokenizer, params, eos, prompt)
    old = ReferenceStopChecker(tokenizer, params, eos, prompt)
    for position, token_id in enumerate(stream):
        assert new.banned_token_ids() == old.banned_token_ids()
        reason = new.append(token_id)
        assert reason == old.append(token_id), (position, params)
        assert (new.text, new.finish_reason, new.stop_reason) == (old.text, old.finish_reason, old.stop_reason), \
            (position, params)
        if reason is not None:
            break
    if not new.finished:
        assert new.finish("stop") == old.finish("stop")
        assert new.text == old.text
    assert new.token_ids == old.token_ids


def test_stream_is_used_for_fast_tokenizers(tokenizer):
    assert Detokenizer(tokenizer, _ids(tokenizer, "Once upon"))._stream is not None


def test_detokenizer_commits_the_windows_text_at_the_same_tokens(tokenizer):
    """DecodeStream against the same window in Python, chunk by chunk, with and without special tokens."""
    prompt = _ids(tokenizer, "A prompt that ends here:")[-5:]
    for skip_special_tokens in (True, False):
        for number, stream in enumerate(_streams(tokenizer)):
            fast = Detokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
            window = Detokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens, use_stream=False)
            for position, token_id in enumerate(stream):
                assert fast.step(token_id) == window.step(token_id), (skip_special_tokens, number, position)
            assert fast.flush() == window.flush()


def test_real_text_and_random_ids_match_the_checker_before(tokenizer):
    eos = [tokenizer.eos_token_id]
    prompt = _ids(tokenizer, "Answer the question below, briefly.")
    for stream in _streams(tokenizer, seed=1):
        for params in (SamplingParams(max_tokens=len(stream)), SamplingParams(max_tokens=max(1, len(stream) // 3)),
                       SamplingParams(max_tokens=200, min_tokens=min(len(stream), 7)),
                       SamplingParams(max_tokens=200, ignore_eos=True, stop_token_ids=(stream[len(stream) // 2],))):
            _assert_same(params, tokenizer, stream, prompt, eos)
            _assert_same(params, tokenizer, stream, [], eos)


def test_stop_strings_spanning_tokens_match_the_checker_before(tokenizer):
    """Stop strings cut from the decoded text at every offset: most span two or more tokens."""
    eos = [tokenizer.eos_token_id]
    rng = random.Random(2)
    for text in TEXTS:
        stream = _ids(tokenizer, text)
        decoded = tokenizer.decode(stream, skip_special_tokens=True)
        for _ in range(25):
            start = rng.randrange(len(decoded) - 4)
            stop = decoded[start:start + rng.randint(2, 12)]
            for params in (SamplingParams(max_tokens=500, stop=(stop,)),
                           SamplingParams(max_tokens=500, stop=(stop, "never there", decoded[-3:])),
                           SamplingParams(max_tokens=500, stop=(stop,), min_tokens=len(stream) // 2)):
                _assert_same(params, tokenizer, stream, _ids(tokenizer, "Go:"), eos)


def test_multibyte_characters_are_held_back_then_whole_or_flushed(tokenizer):
    text = "a🙂b 東京 é👩‍👩‍👧"
    stream = _ids(tokenizer, text)
    for max_tokens in range(1, len(stream) + 1):  # cut at every token: mid-character cuts flush as U+FFFD
        _assert_same(SamplingParams(max_tokens=max_tokens), tokenizer, stream, [], [])
    checker = StopChecker(tokenizer, SamplingParams(max_tokens=100), [])
    for token_id in stream:
        checker.append(token_id)
        assert "\ufffd" not in checker.text
    checker.finish("stop")
    assert checker.text == tokenizer.decode(stream, skip_special_tokens=True)


def test_a_tokenizer_that_cleans_up_spaces_keeps_the_python_window(engine_tokenizer):
    """transformers' clean_up_tokenization_spaces changes decode()'s text, which DecodeStream does not know."""

    class CleaningTokenizer:
        clean_up_tokenization_spaces = True
        backend_tokenizer = engine_tokenizer.backend_tokenizer

        def decode(self, ids, skip_special_tokens=True):
            return engine_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).replace(" ,", ",")

    cleaning = CleaningTokenizer()
    assert Detokenizer(cleaning, [])._stream is None
    stream = _ids(engine_tokenizer, "one , two , three ,")
    _assert_same(SamplingParams(max_tokens=100, stop=("o,",)), cleaning, stream, [], [])
    _assert_same(SamplingParams(max_tokens=100), cleaning, stream, [], [])
