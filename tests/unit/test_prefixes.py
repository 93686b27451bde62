"""Shared-prefix detection (engine/prefixes.py): block-chained digests, keys given to the requests of the
read-ahead that share a prefix, exact token checks (a digest collision never shares), bounded state."""
from __future__ import annotations

import pytest

from seesaw_ds.engine import prefixes as prefixes_mod
from seesaw_ds.engine.prefixes import PrefixIndex, block_digests

SYSTEM = list(range(100, 140))  # 40 tokens = 10 blocks of 4


def test_digests_chain_over_blocks():
    a, b = block_digests(SYSTEM + [1, 2], 4, 10), block_digests(SYSTEM[:20] + [0] * 20, 4, 10)
    assert a[:5] == b[:5] and all(x != y for x, y in zip(a[5:], b[5:]))
    assert len(set(a)) == 10


def test_requests_sharing_a_prefix_get_one_key():
    index = PrefixIndex(block=4, min_tokens=8)
    assert index.admit(0, SYSTEM + [1, 2, 3]) == []  # alone so far
    assigned = index.admit(1, SYSTEM + [4, 5])
    assert [(rid, length) for rid, _, length in assigned] == [(1, 40), (0, 40)]
    key = assigned[0][1]
    assert index.admit(2, SYSTEM + [9]) == [(2, key, 40)]  # a known key
    assert index.key_of(0) == index.key_of(1) == index.key_of(2) == key


def test_the_last_prompt_token_is_never_part_of_a_prefix_and_short_prefixes_are_ignored():
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, SYSTEM)
    assigned = index.admit(1, SYSTEM)
    assert {length for _, _, length in assigned} == {36}
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert index.admit(1, [1, 2, 3, 4, 9, 9, 9, 9, 9]) == []  # one shared block < min_tokens


def test_state_is_released_with_the_read_ahead():
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, SYSTEM + [1])
    (_, key, _), _ = index.admit(1, SYSTEM + [2])
    index.cached(key)
    for request_id in (0, 1):
        index.leave(request_id)
    assert index.num_indexed == 0 and index.num_keys == 1  # the cache still keeps it
    assert index.admit(2, SYSTEM + [3]) == [(2, key, 40)]
    index.leave(2)
    index.release(key)
    assert index.num_keys == 0 and index.key_of(2) is None


def test_a_digest_collision_never_shares_a_prefix(monkeypatch):
    monkeypatch.setattr(prefixes_mod, "block_digests", lambda tokens, block, limit: [b"same"] * limit)
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, SYSTEM + [1])
    assert index.admit(1, [5] * 41) == []  # same digests, other tokens
    (_, key, length), _ = index.admit(2, SYSTEM + [2])
    assert length == 40
    assert index.admit(3, [5] * 41 + [6]) == [] and index.key_of(3) is None  # the digest is taken: no sharing


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_tokens=0"):
        PrefixIndex(block=4, min_tokens=0)


CONVERSATION = list(range(500, 540))  # 40 more tokens two requests share beyond the system preamble


def test_a_waiting_request_takes_a_prefix_twice_as_long_as_its_key():
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, SYSTEM + CONVERSATION + [1])
    (_, short, _), _ = index.admit(1, SYSTEM + [7] * 9)  # the preamble: 0 and 1 share 40 tokens
    assigned = index.admit(2, SYSTEM + CONVERSATION + [2])  # 80 shared with 0: worth more than the preamble
    assert [(rid, length) for rid, _, length in assigned] == [(2, 80), (0, 80)]
    long = assigned[0][1]
    assert index.key_of(0) == index.key_of(2) == long != short and index.key_of(1) == short
    assert index.prefix_of(0) == (long, 80) and index.num_keys == 2
    assert index.admit(3, SYSTEM + CONVERSATION + [3]) == [(3, long, 80)]  # now a known key
    index.leave(1)  # the preamble's last holder left: its key is forgotten
    assert index.num_keys == 1


def test_a_prefix_under_twice_the_known_key_keeps_the_known_key():
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, SYSTEM + CONVERSATION + [1])
    (_, short, _), _ = index.admit(1, SYSTEM + [7] * 9)
    assert index.admit(2, SYSTEM + CONVERSATION[:36] + [2]) == [(2, short, 40)]  # 76 < 2 x 40 shared with 0
    assert index.key_of(0) == short and index.num_keys == 1


def test_a_holder_with_a_long_key_is_not_moved_to_a_shorter_one():
    index = PrefixIndex(block=4, min_tokens=8)
    index.admit(0, SYSTEM + CONVERSATION + [1])
    (_, long, _), _ = index.admit(1, SYSTEM + CONVERSATION + [2])  # 80 shared
    assigned = index.admit(2, SYSTEM + [7] * 9)  # 40 shared with both, who hold 80: the known key is not its
    assert assigned == [] and index.key_of(0) == index.key_of(1) == long and index.num_keys == 1
