"""Shared prompt prefixes among the requests read ahead: which requests can reuse which computed prefix.

Pure, leader-side bookkeeping (no torch, no I/O). A prompt is cut into blocks of ``block`` tokens and each
block-aligned prefix gets a chained digest (BLAKE2b over the previous digest and the block's token ids, as
vLLM's prefix caching hashes blocks). On admission a request is given a *prefix key*:

1. the longest block prefix it shares with a request still waiting in the read-ahead window, when no
   known key is as long as half of it (a key assigned to an earlier request, whose KV is computed or will
   be): that prefix becomes a known key, and the waiting requests holding it get it too (those with no key,
   and those whose key is under half of it: for two requests sharing a conversation of 382 tokens, one
   computing it whole and the other reusing it saves 382 tokens where both reusing a 32-token preamble
   saves 64), so the first of them (in input order) computes it and the others reuse it; else
2. the longest of its block prefixes that is already a known key.

Every match is confirmed by an exact comparison of the token ids (a digest match alone never decides:
wrong output is worse than a recomputed prefix). The read-ahead window is ``kv.prefix_window_tokens``: vLLM
finds such prompts in its cache of every computed block; here they must be waiting together, and on the
bench's 128 chat prompts the pairs sharing a long prefix lie up to 113 prompts (~35,000 tokens) apart.

A prefix is at least ``min_tokens`` long and always leaves the prompt's last token to be computed (its
logits give the first output token). The index holds only the waiting requests' digests and the keys that
waiting requests or the scheduler's prefix cache still use, so it stays as bounded as the read-ahead.
Which prefixes are actually kept computed, and when they are dropped, is the scheduler's decision
(:mod:`seesaw_ds.engine.scheduler`); :meth:`PrefixIndex.release` forgets a key the cache dropped.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from seesaw_ds.kv.blocks import blocks_for


def block_digests(token_ids, block: int, limit: int) -> list[bytes]:
    """Chained digests of the first ``limit`` full blocks of ``token_ids`` (digest i covers blocks 0..i)."""
    digests, previous = [], b""
    for index in range(limit):
        chunk = array("q", token_ids[index * block:(index + 1) * block]).tobytes()
        previous = hashlib.blake2b(previous + chunk, digest_size=16).digest()
        digests.append(previous)
    return digests


@dataclass
class _Known:
    """A prefix key: its tokens (for the exact check), and who uses it."""

    tokens: tuple[int, ...]
    waiting: set[int] = field(default_factory=set)  # waiting requests assigned this key
    cached: int = 0                                  # replicas whose prefix cache keeps it computed


class PrefixIndex:
    """Prefix keys of the waiting requests; see the module docstring."""

    def __init__(self, block: int, min_tokens: int):
        if block < 1 or min_tokens < 1:
            raise ValueError(f"prefix block={block} and min_tokens={min_tokens} must be >= 1")
        self.block = block
        self.min_blocks = blocks_for(min_tokens, block)
        self._holders: dict[bytes, set[int]] = {}     # digest -> waiting requests whose prompt has that prefix
        self._chains: dict[int, list[bytes]] = {}     # waiting request -> its digests
        self._known: dict[bytes, _Known] = {}
        self._key_of: dict[int, bytes] = {}           # waiting request -> its key
        self._tokens: dict[int, object] = {}          # waiting request -> its prompt (for the exact checks)

    def admit(self, request_id: int, token_ids) -> list[tuple[int, bytes, int]]:
        """Index a newly read request; returns ``(request_id, key, length)`` for every request whose prefix
        key this admission set (the new one, and waiting ones that now share a prefix with it)."""
        usable = (len(token_ids) - 1) // self.block  # the last token is always computed
        chain = block_digests(token_ids, self.block, usable) if usable >= self.min_blocks else []
        known_length, known_digest = 0, None
        for index in range(len(chain) - 1, self.min_blocks - 2, -1):  # the longest known key
            known = self._known.get(chain[index])
            if known is not None and tuple(token_ids[:len(known.tokens)]) == known.tokens:
                known_length, known_digest = len(known.tokens), chain[index]
                break
        assigned: list[tuple[int, bytes, int]] = []
        for index in range(len(chain) - 1, self.min_blocks - 2, -1):  # the longest shared one, if long enough
            length = (index + 1) * self.block
            if length < 2 * known_length or chain[index] in self._known:
                break  # this one and shorter ones save less than the known key
            prefix = tuple(token_ids[:length])
            takers = [other for other in sorted(self._holders.get(chain[index], ()))
                      if self._key_length(other) * 2 <= length and tuple(self._tokens[other][:length]) == prefix]
            if not takers:
                continue
            self._known[chain[index]] = _Known(prefix)
            assigned.append(self._assign(request_id, chain[index]))
            assigned.extend(self._assign(other, chain[index]) for other in takers)
            break
        if not assigned and known_digest is not None:
            assigned.append(self._assign(request_id, known_digest))
        self._chains[request_id] = chain
        self._tokens[request_id] = token_ids
        for digest in chain:
            self._holders.setdefault(digest, set()).add(request_id)
        return assigned

    def _key_length(self, request_id: int) -> int:
        key = self._key_of.get(request_id)
        return 0 if key is None else len(self._known[key].tokens)

    def _assign(self, request_id: int, key: bytes) -> tuple[int, bytes, int]:
        previous = self._key_of.get(request_id)
        if previous is not None:  # a waiting request's key given up for a longer one
            self._known[previous].waiting.discard(request_id)
            self._forget_if_unused(previous)
        known = self._known[key]
        known.waiting.add(request_id)
        self._key_of[request_id] = key
        return request_id, key, len(known.tokens)

    def leave(self, request_id: int) -> None:
        """A request left the read-ahead window (it was prefilled, or refused)."""
        self._tokens.pop(request_id, None)
        for digest in self._chains.pop(request_id, ()):
            holders = self._holders[digest]
            holders.discard(request_id)
            if not holders:
                del self._holders[digest]
        key = self._key_of.pop(request_id, None)
        if key is not None:
            self._known[key].waiting.discard(request_id)
            self._forget_if_unused(key)

    def cached(self, key: bytes) -> None:
        """The scheduler keeps ``key``'s KV computed (on one more replica)."""
        self._known[key].cached += 1

    def release(self, key: bytes) -> None:
        """The scheduler dropped ``key`` from one replica's prefix cache."""
        known = self._known.get(key)
        if known is not None:
            known.cached -= 1
            self._forget_if_unused(key)

    def _forget_if_unused(self, key: bytes) -> None:
        known = self._known[key]
        if not known.waiting and not known.cached:
            del self._known[key]

    def key_of(self, request_id: int) -> bytes | None:
        return self._key_of.get(request_id)

    def prefix_of(self, request_id: int) -> tuple[bytes, int] | None:
        """A waiting request's prefix key and its length in tokens, or None."""
        key = self._key_of.get(request_id)
        return None if key is None else (key, len(self._known[key].tokens))

    @property
    def num_keys(self) -> int:
        return len(self._known)

    @property
    def num_indexed(self) -> int:
        """Digests held for the waiting requests (bounded by the read-ahead)."""
        return len(self._holders)
