"""Shared fixtures for the unit tests."""

from __future__ import annotations

import pytest


def _throwaway_tokenizer():
    """A small byte-level BPE tokenizer with eos and a chat template, for when the project's is unavailable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["hello world, the quick brown fox jumps over the lazy dog.",
              "a batch of prompts goes in and a batch of answers comes out.",
              "stop strings, stop tokens and the end of sequence token end a request."]
    tok.train_from_iterator(corpus * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>")
    wrapped.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                             "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    return wrapped


@pytest.fixture(scope="session")
def engine_tokenizer():
    """The project's tiny byte-level BPE tokenizer (eos, chat template); a throwaway one if it is missing.

    Uses `seesaw_ds.model.tiny.build_tokenizer` (the tokenizer `make_tiny_model` writes) rather than a whole
    checkpoint: building the model takes seconds that tokenizer-only tests do not need.
    """
    try:
        from seesaw_ds.model.tiny import build_tokenizer
    except ImportError:
        return _throwaway_tokenizer()
    return build_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: far too small to gain from threads, and on a shared 2-core box spinning
    OpenMP workers made generation ten times slower. Restores the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
