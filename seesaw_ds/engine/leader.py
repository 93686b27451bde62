"""The instance leader: turns scheduler plans into step messages and step results into answers.

The leader (instance rank 0) owns every request's state: its prompt, its sampling, where its KV lies
(waiting, staged in which extents, running on which decode replica), its stop checker and, for structured
output, its grammar matcher (so grammar state survives eviction and layout switches). Each step it asks
the :class:`~seesaw_ds.engine.scheduler.Scheduler` what to do, allocates staging extents, and builds the
:class:`~seesaw_ds.engine.worker.StepMessage`; after the step it feeds the sampled tokens to the stop
checkers, hands finished requests to the result sink and tells the scheduler.

A request with n > 1 samples is n sequences with consecutive ids: the prompt runs once (sample 0's work),
its KV is staged once in extents that all n reference (`ExtentAllocator(refs=n)`; each sample's swap-in
drops one reference), every sample draws with its own seed (`sample_seed`) and keeps its own stop checker,
grammar matcher and logprobs; the request is answered when its last sample finishes.

Shared prefixes (`engine/prefixes.py` finds them, the scheduler decides which are computed and kept): a prompt that
computes a prefix the scheduler keeps stages that prefix in extents of their own, which the prefix cache of the
prefill replica's home (the replicas that read each other's staging) also references; a prompt reusing it runs only
its suffix, with the cached extents as its attention context (`SeqWork.context_extents`), and its staged KV is those
extents followed by its own. Extents are reference-counted, so a prefix lives while the cache or any staged sequence
holds it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from seesaw_ds.engine.logprobs import TokenLogprobs, token_ids_of
from seesaw_ds.engine.grammar import Grammars, TokenMatcher
from seesaw_ds.engine.outputs import Sample
from seesaw_ds.engine.penalties import needs_history
from seesaw_ds.engine.prefixes import PrefixIndex
from seesaw_ds.engine.requests import BadLine, Request
from seesaw_ds.engine.sampling import RequestError, StopChecker, sample_seed
from seesaw_ds.engine.scheduler import Phase, Scheduler, StepPlan
from seesaw_ds.engine.worker import SeqSampling, StepMessage, StepResult
from seesaw_ds.kv.staging import ExtentAllocator, StagedSeq
from seesaw_ds.model.executor import ForwardPlan, SeqWork

log = logging.getLogger("seesaw_ds")


@dataclass
class SeqState:
    """Everything the leader knows about one request in flight."""

    request: Request
    checker: StopChecker
    kv_tokens: int = 0
    staged: StagedSeq | None = None
    replica: int | None = None
    last_token: int | None = None
    matcher: TokenMatcher | None = None
    """Structured output: the request's place in its grammar (engine/grammar.py), else None."""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    """One entry per generated token when the request asks for logprobs."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """[None, then one entry per prompt token after the first] when the request asks for prompt_logprobs."""
    sample_index: int = 0
    """Which of the request's n samples this sequence is."""
    first_id: int = 0
    """The seq_id of the request's sample 0 (its samples have ids first_id..first_id+n-1)."""
    shared: tuple[object, int] | None = None
    """(key, tokens): the leading KV the device tier may hold once for several sequences (StagedSeq.shared)."""

    @property
    def final_tokens(self) -> int:
        """The KV length this request may reach (its device blocks are reserved up to it)."""
        return len(self.request.prompt_token_ids) + self.request.sampling.max_tokens


@dataclass
class Finished:
    """A request that finished, ready to be written."""

    request: Request
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    """Per generated token, when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token (None for the first), when the request asked for prompt_logprobs."""
    token_texts: dict[int, str] = field(default_factory=dict)
    """Each token id the logprobs mention, decoded on its own (for the output record)."""
    samples: list[Sample] | None = None
    """n > 1: every sample in order (the fields above are sample 0's); None for n = 1."""


@dataclass
class _Answers:
    """The finished samples of a request with n > 1, until the last one finishes."""

    samples: list[Sample | None]
    prompt_logprobs: list[TokenLogprobs | None] | None = None


#: The timeline keeps at most this many records: when it is full, neighbouring records merge pairwise (the
#: resolution halves), so a job of millions of steps keeps a fixed-size picture of its whole run.
MAX_TIMELINE_RECORDS = 4096


@dataclass
class StepRecord:
    """One point of the timeline: what a step (or `steps` consecutive steps) did and how full the staging
    area was after it."""

    time: float
    phase: str
    batch_size: float
    tokens: int
    staging_tokens: int
    seconds: float
    steps: int = 1

    def merged(self, later: "StepRecord") -> "StepRecord":
        """This record and the next one as one: times from the first, sums of tokens, seconds and steps, the
        mean batch size, the staging occupancy after the later one, the phase that took longer."""
        steps = self.steps + later.steps
        return StepRecord(self.time, self.phase if self.seconds >= later.seconds else later.phase,
                          (self.batch_size * self.steps + later.batch_size * later.steps) / steps,
                          self.tokens + later.tokens, later.staging_tokens, self.seconds + later.seconds, steps)


def append_bounded(timeline: list[StepRecord], record: StepRecord, limit: int = MAX_TIMELINE_RECORDS) -> None:
    """Append `record` to `timeline` (in place), at a uniform resolution: every record covers as many steps as
    the first one does (the last one fills up first); when `limit` records are reached, neighbouring pairs
    merge and each record covers twice as many steps from then on."""
    if timeline and timeline[-1].steps < timeline[0].steps:
        timeline[-1] = timeline[-1].merged(record)
    else:
        timeline.append(record)
    if len(timeline) >= limit:
        timeline[:] = [timeline[i].merged(timeline[i + 1]) if i + 1 < len(timeline) else timeline[i]
                       for i in range(0, len(timeline), 2)]


@dataclass
class LeaderStats:
    """Counters the leader keeps for the metrics file."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    finished: int = 0
    rejected: int = 0
    phase_seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    transition_seconds: float = 0.0
    reshard_bytes: int = 0
    compile_seconds: float = 0.0
    """Of the steps' time, what the slowest rank of each step spent compiling graphs (model.compile)."""
    grammar_masks: int = 0
    """Next-token bitmasks computed for structured output (finished requests)."""
    grammar_seconds: float = 0.0
    """Time those bitmasks took on the leader."""
    timeline: list[StepRecord] = field(default_factory=list)
    """At most MAX_TIMELINE_RECORDS records (see `append_bounded`)."""


class Leader:
    """Decides every step of one instance."""

    def __init__(self, scheduler: Scheduler, staging_tokens: int, tokenizer, eos_ids: list[int],
                 source, *, refill_tokens: int, grammars: Grammars | None = None,
                 prefixes: PrefixIndex | None = None):
        self.scheduler = scheduler
        self.prefixes = prefixes
        self._prefix_extents: dict[tuple[bytes, int], list[tuple[int, int]]] = {}  # cached (key, home)
        self.grammars = grammars
        self.extents = ExtentAllocator(staging_tokens)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.source = source
        self.refill_tokens = refill_tokens
        self.seqs: dict[int, SeqState] = {}
        self.stats = LeaderStats()
        self._next_id = 0
        self._answers: dict[int, _Answers] = {}  # n > 1: first_id -> its samples finished so far
        self._waiting_tokens = 0
        self._release: list[int] = []
        self._plan: StepPlan | None = None
        self._swapped_in: list[StagedSeq] = []
        self._began = time.perf_counter()
        self._exhausted = False

    # ------------------------------------------------------------ input
    def _refill(self, rejected: list) -> None:
        while not self._exhausted and self._waiting_tokens < self.refill_tokens:
            batch = self.source.take(16)
            if not batch:
                self._exhausted = True
                break
            for item in batch:
                if isinstance(item, BadLine):
                    rejected.append(item)
                    continue
                self._admit(item, rejected)

    def _admit(self, request: Request, rejected: list) -> None:
        first_id, num_samples = self._next_id, request.sampling.n
        self._next_id += num_samples
        try:
            # a grammar the library refuses is this row's error; each sample walks its own matcher
            matchers = [self._matcher(request) for _ in range(num_samples)]
            self.scheduler.add_request(first_id, len(request.prompt_token_ids), request.sampling.max_tokens,
                                       num_samples=num_samples)
        except ValueError as error:
            rejected.append(BadLine(request.line_no, request.custom_id, str(error), request.kind))
            return
        for index, matcher in enumerate(matchers):
            checker = StopChecker(self.tokenizer, request.sampling, self.eos_ids, request.prompt_token_ids)
            self.seqs[first_id + index] = SeqState(request=request, checker=checker, matcher=matcher,
                                                   sample_index=index, first_id=first_id)
        if num_samples > 1:
            self._answers[first_id] = _Answers([None] * num_samples)
        self._waiting_tokens += len(request.prompt_token_ids)
        if self.prefixes is not None and self._may_share_prefix(request):
            for prompt_id, key, length in self.prefixes.admit(first_id, request.prompt_token_ids):
                previous = self.scheduler.assign_prefix(prompt_id, key, length)
                self._waiting_tokens -= length - previous  # the read-ahead counts the tokens to compute

    @staticmethod
    def _may_share_prefix(request: Request) -> bool:
        """Prompt logprobs need every prompt position computed, and penalties that read the prompt need the
        whole prompt on the sampling rank: such requests are computed whole."""
        return request.sampling.prompt_logprobs is None and not needs_history(request.sampling)

    def _matcher(self, request: Request) -> TokenMatcher | None:
        if request.grammar is None:
            return None
        if self.grammars is None:
            raise RequestError(f"{request.grammar.key}: structured output is not set up in this engine")
        return self.grammars.matcher(request.grammar)

    # ------------------------------------------------------------ plan -> message
    def next_message(self, rejected: list) -> StepMessage:
        """The next step (``phase == "stop"`` once every request is answered)."""
        self._refill(rejected)
        plan = self.scheduler.schedule()
        if plan is None:
            return StepMessage("stop", release=self._take_release())
        self._plan = plan
        if plan.phase is Phase.PREFILL:
            return self._prefill_message(plan)
        return self._decode_message(plan)

    def _prefill_work(self, seq_id: int, replica: int, prompt, n: int, prefix: tuple[bytes, int] | None,
                      plan: StepPlan) -> SeqWork:
        """A prompt's prefill work and staging extents: whole, whole with its prefix kept by the replica's
        prefix cache (`plan.retain`), or its suffix only over the cached prefix (`plan.cached`)."""
        home = self.scheduler.prefix_home(replica)  # the replicas of one home share their cached prefixes
        if seq_id in plan.cached:
            key, length = prefix
            cached = self._prefix_extents[(key, home)]
            self.extents.share(cached, refs=n)
            own = self.extents.allocate(len(prompt) - length, refs=n)
            return SeqWork(seq_id, replica, list(prompt[length:]), length, staging_extents=own,
                           context_extents=cached)
        if seq_id in plan.retain:
            key, length = prefix
            kept = self.extents.allocate(length, refs=n + 1)  # the prefix cache holds one reference
            self._prefix_extents[(key, home)] = kept
            self.prefixes.cached(key)
            return SeqWork(seq_id, replica, list(prompt), 0,
                           staging_extents=kept + self.extents.allocate(len(prompt) - length, refs=n))
        return SeqWork(seq_id, replica, list(prompt), 0, staging_extents=self.extents.allocate(len(prompt), refs=n))

    def _device_shared(self, seq_id: int, prompt_len: int, n: int, prefix: tuple[bytes, int] | None
                       ) -> tuple[object, int] | None:
        """What of a prompt's KV the device tier may hold once for several sequences: with n > 1 samples the
        prompt's whole blocks (all but its last token at least: each sample writes past it), else its shared
        prefix (block-aligned: prefixes are found block by block in blocks of the device tier's size)."""
        if n > 1:
            return ("samples", seq_id), (prompt_len - 1) // self.scheduler.block_size * self.scheduler.block_size
        return prefix

    def _take_release(self) -> list[int]:
        release, self._release = self._release, []
        return release

    def _prefill_message(self, plan: StepPlan) -> StepMessage:
        works, register, bitmasks, samples = [], {}, {}, {}
        for key, home in plan.dropped:  # first: the scheduler counted their room for this step's prompts
            self.extents.free(self._prefix_extents.pop((key, home)))
            self.prefixes.release(key)
        for replica, seq_ids in enumerate(plan.prefill):
            for seq_id in seq_ids:  # a request's samples come together, sample 0 first
                state = self.seqs[seq_id]
                prompt = state.request.prompt_token_ids
                sampling = state.request.sampling
                if state.sample_index == 0:  # the prompt runs once; its KV is staged once for all samples
                    prefix = self.prefixes.prefix_of(seq_id) if self.prefixes is not None else None
                    self._waiting_tokens -= len(prompt) - (prefix[1] if prefix else 0)
                    work = self._prefill_work(seq_id, replica, prompt, sampling.n, prefix, plan)
                    if self.prefixes is not None:
                        self.prefixes.leave(seq_id)  # after the cache took its key, if it keeps it
                    extents = (work.context_extents or []) + work.staging_extents
                    work.prompt_logits = sampling.prompt_logprobs is not None
                    works.append(work)
                    if sampling.n > 1:
                        samples[seq_id] = list(range(seq_id + 1, seq_id + sampling.n))
                    shared = self._device_shared(seq_id, len(prompt), sampling.n, prefix)
                else:
                    extents = self.seqs[state.first_id].staged.extents
                    shared = self.seqs[state.first_id].shared
                state.shared = shared
                state.staged = StagedSeq(seq_id, extents, len(prompt), writer="prefill", writer_replica=replica,
                                         final_tokens=state.final_tokens, shared=shared)
                state.kv_tokens = len(prompt)
                register[seq_id] = SeqSampling(sampling, sample_seed(state.request.seed, state.sample_index),
                                               len(prompt), state.request.bad_words_token_ids)
                if state.matcher is not None:
                    bitmasks[seq_id] = state.matcher.next_token_bitmask()
        return StepMessage("prefill", forward=ForwardPlan("prefill", works, sink="staging"), register=register,
                           release=self._take_release(), token_bitmasks=bitmasks, samples=samples)

    def _decode_message(self, plan: StepPlan) -> StepMessage:
        swap_out, swap_in, works, banned, bitmasks = [], [], [], {}, {}
        for replica, seq_ids in enumerate(plan.swap_out):
            for seq_id in seq_ids:
                state = self.seqs[seq_id]
                extents = self.extents.allocate(state.kv_tokens)
                state.staged = StagedSeq(seq_id, extents, state.kv_tokens, writer="decode", writer_replica=replica,
                                         final_tokens=state.final_tokens, shared=state.shared)
                state.replica = None
                swap_out.append(state.staged)
        for replica, seq_ids in enumerate(plan.swap_in):
            for seq_id in seq_ids:
                state = self.seqs[seq_id]
                state.staged.reader_replica = replica
                state.replica = replica
                swap_in.append(state.staged)
        for replica, seq_ids in enumerate(plan.decode):
            for seq_id in seq_ids:
                state = self.seqs[seq_id]
                works.append(SeqWork(seq_id, replica, [state.last_token], state.kv_tokens))
                if state.matcher is not None:
                    # The grammar alone decides where a constrained text ends (min_tokens does not apply): a ban
                    # on eos where the grammar allows nothing else would leave no token at all.
                    bitmasks[seq_id] = state.matcher.next_token_bitmask()
                    continue
                ban = state.checker.banned_token_ids()
                if ban:
                    banned[seq_id] = ban
        self._swapped_in = swap_in
        return StepMessage("decode", forward=ForwardPlan("decode", works), release=self._take_release(),
                           swap_out=swap_out, swap_in=swap_in, banned=banned, token_bitmasks=bitmasks)

    @staticmethod
    def _advance_grammar(state: SeqState) -> str | None:
        """Feed the drawn token to the request's grammar: "stop" once the grammar is complete (its stop token
        accepted, whatever ignore_eos or min_tokens say), else None."""
        if not state.matcher.accept(state.last_token):
            # Only when something else forbade every token the grammar allows (e.g. bad_words).
            log.warning("request %r: token %d does not follow its grammar (%s); it ends here",
                        state.request.custom_id, state.last_token, state.request.grammar.key)
            return state.checker.finish("stop")
        return state.checker.finish("stop") if state.matcher.terminated else None

    # ------------------------------------------------------------ results
    def absorb(self, message: StepMessage, results: list[StepResult], seconds: float) -> list[Finished]:
        """Apply one step's results; returns the requests that finished."""
        plan, self._plan = self._plan, None
        tokens: dict[int, int] = {}
        logprobs: dict[int, TokenLogprobs] = {}
        for result in results:
            tokens.update(result.tokens)
            logprobs.update(result.logprobs)
            for seq_id, entries in result.prompt_logprobs.items():
                self.seqs[seq_id].prompt_logprobs = [None, *entries]
        switch = max((r.switch_seconds for r in results), default=0.0)
        self.stats.transition_seconds += switch
        self.stats.reshard_bytes += sum(r.switch_bytes for r in results)
        self.stats.compile_seconds += max((r.compile_seconds for r in results), default=0.0)
        self.stats.phase_seconds[message.phase] += max(0.0, seconds - switch)
        for staged in self._swapped_in:
            self.extents.free(staged.extents)
            self.seqs[staged.seq_id].staged = None
        self._swapped_in = []
        finished_ids, done = [], []
        ran = [s for work in message.forward.seqs for s in (work.seq_id, *message.samples.get(work.seq_id, ()))]
        for seq_id in ran:
            state = self.seqs[seq_id]
            if message.phase == "decode":
                state.kv_tokens += 1
            state.last_token = tokens[seq_id]
            if seq_id in logprobs:
                state.logprobs.append(logprobs[seq_id])
            reason = state.checker.append(state.last_token)
            if reason is None and state.checker.finished:
                reason = state.checker.finish_reason
            if reason is None and state.matcher is not None:
                reason = self._advance_grammar(state)
            if reason is not None:
                finished_ids.append(seq_id)
                answer = self._finish(seq_id, reason)
                if answer is not None:
                    done.append(answer)
        self.scheduler.complete(plan, finished_ids)
        batch_tokens = sum(len(w.tokens) for w in message.forward.seqs)
        append_bounded(self.stats.timeline, StepRecord(time.perf_counter() - self._began, message.phase,
                                                       len(message.forward.seqs), batch_tokens,
                                                       self.scheduler.staging_used_tokens, seconds))
        return done

    def _finish(self, seq_id: int, reason: str) -> Finished | None:
        """Forget a finished sequence; its request's answer once it was the request's last sample, else None."""
        state = self.seqs.pop(seq_id)
        if state.staged is not None:
            self.extents.free(state.staged.extents)  # a shared prompt's extents: one reference
        self._release.append(seq_id)
        checker = state.checker
        if state.matcher is not None:
            self.stats.grammar_masks += state.matcher.num_masks
            self.stats.grammar_seconds += state.matcher.mask_seconds
        self.stats.output_tokens += len(checker.token_ids)
        params = state.request.sampling
        logprobs = state.logprobs if params.logprobs is not None else None
        prompt_logprobs = None
        if params.prompt_logprobs is not None and state.sample_index == 0:  # a one-token prompt scores nothing
            prompt_logprobs = state.prompt_logprobs or [None]
        sample = Sample(list(checker.token_ids), checker.text, reason, logprobs)
        samples = None
        if params.n > 1:
            answers = self._answers[state.first_id]
            answers.samples[state.sample_index] = sample
            if state.sample_index == 0:
                answers.prompt_logprobs = prompt_logprobs
            if any(done is None for done in answers.samples):
                return None
            del self._answers[state.first_id]
            samples, prompt_logprobs, sample = answers.samples, answers.prompt_logprobs, answers.samples[0]
        self.stats.finished += 1
        self.stats.prompt_tokens += len(state.request.prompt_token_ids)  # prefilled once, whatever n is
        ids = token_ids_of([*(entry for s in samples or [sample] for entry in s.logprobs or ()),
                            *(prompt_logprobs or ())])
        texts = {token_id: self.tokenizer.decode([token_id]) for token_id in sorted(ids)}
        return Finished(state.request, sample.token_ids, sample.text, sample.finish_reason, sample.logprobs,
                        prompt_logprobs, texts, samples)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._began
