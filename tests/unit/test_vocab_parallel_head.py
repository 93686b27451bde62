"""The vocabulary-parallel lm_head (seesaw_ds/model/modules.py): each TP rank multiplies its rows, the first
rank gathers, drops the padding of an uneven last piece and returns the whole vocabulary's logits, equal to
the unsplit head. The gather is a stand-in here (the multi-rank tests run the real one under tp2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from seesaw_ds.backends import deepspeed as backend
from seesaw_ds.model.modules import VocabParallelHead


@pytest.mark.parametrize("vocab,tp", [(12, 2), (10, 3), (7, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_first_rank_gets_the_whole_heads_logits(monkeypatch, vocab, tp, bias):
    torch.manual_seed(0)
    full = nn.Linear(16, vocab, bias=bias)
    hidden = torch.randn(5, 16)
    chunk = -(-vocab // tp)
    heads = []
    for rank in range(tp):
        start = min(vocab, rank * chunk)
        rows = min(chunk, vocab - start)
        piece = nn.Linear(16, rows, bias=bias)
        with torch.no_grad():
            piece.weight.copy_(full.weight[start:start + rows])
            if bias:
                piece.bias.copy_(full.bias[start:start + rows])
        heads.append(VocabParallelHead(piece, vocab, chunk, group=None, ranks=tuple(range(tp))))
    sent = {}
    with torch.no_grad():
        for rank in range(1, tp):  # the other ranks: their piece goes to the gather, and comes back to them
            monkeypatch.setattr(backend, "gather_to_first",
                                lambda tensor, group, ranks, rank=rank: sent.__setitem__(rank, tensor))
            local = heads[rank](hidden)
            assert local.shape == (5, chunk), "equal shapes for the gather: the last piece is padded"
            assert torch.equal(sent[rank], local)

        def gather(tensor, group, ranks):
            assert ranks == tuple(range(tp))
            return [tensor] + [sent[rank] for rank in range(1, tp)]
        monkeypatch.setattr(backend, "gather_to_first", gather)
        torch.testing.assert_close(heads[0](hidden), full(hidden))
