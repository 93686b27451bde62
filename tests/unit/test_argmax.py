"""A greedy step's tokens from bf16 logits without a float32 copy (``kernels.argmax``, the extension's
``argmax_rows``): the same index as ``torch.argmax`` of the rows widened to float32, ties to the first, NaN as the
largest, rows of all -inf to 0, row lengths around the 16-lane vectors, strided rows; and the sampler's use of
it: bf16 logits of greedy rows give the float32 path's tokens, and anything else (a sampled row, a ban, a
penalty) is widened first and drawn exactly as before."""
from __future__ import annotations

import pytest
import torch

from seesaw_ds.engine.params import SamplingParams
from seesaw_ds.engine.sampling import sample_next_tokens
from seesaw_ds.model import kernels


def test_the_kernel_is_the_one_that_runs_here():
    assert kernels.built()
    assert hasattr(kernels.load(), "argmax_rows")


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 31, 48, 1000, 49152])
def test_argmax_matches_torch_on_the_widened_rows(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(24, vocab).to(torch.bfloat16)
    logits[1] = 0.0  # one value everywhere: the first index
    logits[2] = float("-inf")  # every token forbidden: 0, as torch gives
    if vocab > 3:
        logits[3, 1] = logits[3, vocab - 1] = 40.0  # a tie far apart
        logits[4, vocab - 2] = float("nan")  # NaN counts as the largest
        logits[4, vocab - 1] = float("nan")
        logits[5, vocab - 1] = 50.0  # the last column (a vector's tail)
        logits[6, :] = float("-inf")
        logits[6, vocab // 2] = -1e30
    got = kernels.argmax(logits)
    assert got.dtype == torch.long
    assert torch.equal(got, logits.float().argmax(dim=1))


def test_argmax_reads_strided_rows():
    torch.manual_seed(1)
    wide = torch.randn(8, 300).to(torch.bfloat16)
    rows = wide[:, 20:277]  # each row contiguous, 300 apart
    assert rows.stride() == (300, 1)
    assert torch.equal(kernels.argmax(rows), rows.float().argmax(dim=1))


def test_sampler_takes_bf16_logits_of_greedy_rows_and_widens_the_rest():
    torch.manual_seed(2)
    logits = torch.randn(6, 500).to(torch.bfloat16)
    greedy = [SamplingParams(temperature=0.0)] * 6
    seeds, steps = list(range(6)), [0] * 6
    want = sample_next_tokens(logits.float(), greedy, seeds, steps)
    assert torch.equal(sample_next_tokens(logits, greedy, seeds, steps), want)
    # a sampled row, a ban and a penalty: the bf16 logits are widened and drawn as float32 ones are
    mixed = [SamplingParams(temperature=0.8)] + greedy[1:]
    assert torch.equal(sample_next_tokens(logits, mixed, seeds, steps),
                       sample_next_tokens(logits.float(), mixed, seeds, steps))
    banned = [[int(want[0])]] + [[]] * 5
    banned_tokens = sample_next_tokens(logits, greedy, seeds, steps, banned)
    assert banned_tokens[0] != want[0]
    assert torch.equal(banned_tokens, sample_next_tokens(logits.float(), greedy, seeds, steps, banned))
    biased = [SamplingParams(temperature=0.0, logit_bias={7: 100.0})] + greedy[1:]
    assert sample_next_tokens(logits, biased, seeds, steps)[0] == 7


def test_argmax_suffices_only_for_greedy_rows_with_nothing_else_to_apply():
    from seesaw_ds.engine.sampling import argmax_suffices

    greedy = [SamplingParams(temperature=0.0)] * 3
    assert argmax_suffices(greedy) and argmax_suffices(greedy, [[], [], []], [None, None, None])
    assert argmax_suffices(greedy, {}.values(), {}.values())  # the worker's step message: dicts by sequence
    assert not argmax_suffices([SamplingParams(temperature=0.8)] + greedy[1:])
    assert not argmax_suffices([SamplingParams(temperature=0.0, logit_bias={7: 1.0})] + greedy[1:])
    assert not argmax_suffices([SamplingParams(temperature=0.0, repetition_penalty=1.3)] + greedy[1:])
    assert not argmax_suffices(greedy, [[], [5], []])
    assert not argmax_suffices(greedy, {4: [5]}.values())
    assert not argmax_suffices(greedy, None, [None, object(), None])
