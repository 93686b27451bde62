"""CUDA graphs of the decode step (``model.cuda_graphs``): one graph per batch-size bucket, captured after an
eager warm-up of the same step, replayed while the layout stays active, dropped when it changes.

Why: on a GPU a decode step is bound by the host. An 8-layer Llama-3-8B-shaped step launched ~450 kernels
and took 10.4 ms at batch 1 for 2.0 ms of device work (docs/gpu.md); a graph launches them all in one call.

What a graph holds: the stage's embedding and decoder layers, reading the persistent step buffers
(:mod:`seesaw_ds.model.decode_step`) padded to the bucket, writing the new K/V into the device tier and leaving
the last hidden states in a tensor of the graph's pool. The head (final norm, ``lm_head``, logit scaling, the
TP gather of logits) and sampling stay outside: they run on the real rows only, in whatever dtype the caller
asks for, and the token choice stays on the host's terms (grammar masks, penalties, seeds).

Buckets: the batch sizes a graph is captured for are vLLM's (1, 2, 4, then every multiple of 8) up to
``scheduler.max_decode_seqs``, the step buffers' rows, itself the last; each is captured on its first use
only; a step of ``n`` sequences runs the smallest bucket ``>= n``, its extra rows padding that feed token 0 at
position 0, write their K/V into a scratch block that no sequence owns and attend to it alone
(:meth:`DecodeBuffers.fill`'s ``rows``). Rows are independent in every operation of a step, so padding changes
no real row's result beyond what a different GEMM shape may round differently.

Re-shards: a layout switch points every parameter at new device tensors (:meth:`StageModel.to_device`), so
the graphs of the previous activation would read freed weights. :meth:`DecodeGraphs.drop` forgets them at
every activation that moves weights, and each bucket is captured again on its first use under the new one
(measured per capture: ``capture_seconds``). The same happens when the rotary tables grow
(``SequenceRope.generation``).

Checks: every capture is replayed once right after it and its hidden states compared row by row with the eager
warm-up's (the same step, the same kernels): a graph that reads stale memory gives other numbers, and then graphs
are off for the rest of the run, said in one warning; so is a capture that fails (an operation the capture
refuses), the step's eager result standing. Under ``auto`` a bucket keeps its graph only where a second replay
measured faster than the eager step (both timed to the completion of the step's stream, not the whole device's:
the staging area's copies run beside; the first replay uploads the graph), once per bucket; under ``true`` it
keeps it regardless.

Ranks of one tensor-parallel group decide together (``agree``: an OR over the group's host twin): a graph holds
the step's all-reduces, so a rank that replays while another steps eagerly would pair its collectives with
other ones. A capture that failed on any rank, a replay that differed on any, or (``auto``) a replay slower on
any, counts for all of them.

Memory: the buckets' graphs share one pool. torch keeps a pool while a graph captured into it lives, and a
pool whose graphs were all freed while some block of it stayed allocated cannot be captured into again, so
every graph captured into the current pool is kept (a bucket measured slower too) until :meth:`DecodeGraphs.drop`
lets the pool go with them. A capture that fails leaves torch's capture state half-open (the stream switched,
the allocator still routing to the pool): :meth:`CudaGraphs.capture` closes it before the error goes on.

Nothing here is hand-written capture: it is ``torch.cuda.CUDAGraph`` with one memory pool shared by the
buckets. :class:`ReplayFake` stands in for it on a CPU (the tests): it runs the captured function again at
each replay, which reads the step buffers as a graph would, so what the bookkeeping gets wrong (a size or a
tensor taken at capture time instead of from the buffers, a stale bucket) shows as a wrong token.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "true", "false")
"""``model.cuda_graphs``: ``auto`` graphs where they measure faster, ``true`` wherever they apply, ``false`` none."""


def buckets(max_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for (pure): 1, 2, 4, then multiples of 8, and ``max_seqs`` itself (the
    step buffers' rows) as the last."""
    sizes = [size for size in (1, 2, 4) if size < max_seqs] + list(range(8, max_seqs, 8))
    return sizes + [max_seqs]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds ``n`` rows; None past the largest (pure)."""
    return next((size for size in sizes if size >= n), None)


def alone(flags: list[bool]) -> list[bool]:
    """``agree`` for a rank that decides alone (no tensor-parallel peers): its own flags."""
    return flags


def resolve(mode: str | bool, device: torch.device) -> str:
    """``model.cuda_graphs`` as ``auto``/``true``/``false``, ``false`` off CUDA (a CPU step launches no kernels
    to save)."""
    mode = {True: "true", False: "false"}.get(mode, str(mode).lower())
    if mode not in MODES:
        raise ValueError(f"model.cuda_graphs={mode!r}: expected one of {', '.join(MODES)}")
    return mode if torch.device(device).type == "cuda" else "false"


def _first_line(error: BaseException) -> str:
    """The first line of what went wrong first: a failed capture raises at its end, its cause in the context."""
    while error.__context__ is not None and isinstance(error.__context__, RuntimeError):
        error = error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def row_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest absolute difference of a row, in units of that row's largest absolute value (at least 1)
    (pure): a row of small values is judged on its own scale, not on another row's outliers."""
    if not reference.numel():
        return 0.0
    rows = reference.float().reshape(reference.shape[0], -1)
    differences = (output.float().reshape(rows.shape) - rows).abs().amax(dim=1)
    return (differences / rows.abs().amax(dim=1).clamp(min=1.0)).max().item()


class CudaGraphs:
    """Capture and replay through ``torch.cuda.CUDAGraph``, every bucket's graph in one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool = None

    def capture(self, body: Callable[[], torch.Tensor]):
        """Record ``body``'s kernels (nothing runs); returns ``(graph, output)``, ``output`` the tensor the
        replays write into. On a failure the stream and the allocator are put back before the error goes on:
        ``torch.cuda.graph`` ends the capture before it restores the stream, and a capture that cannot end
        raises there, leaving this thread on the capture stream and the allocator routing to the pool."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            # thread_local: the staging area's copy thread may queue copies on its own stream meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = body()
        except BaseException:
            torch.cuda.set_stream(stream)
            end_pool = getattr(torch.cuda.memory, "_cuda_endAllocateToPool", None)  # torch's own, since 2.5
            if end_pool is not None:
                with contextlib.suppress(RuntimeError):  # already ended where the capture ended cleanly
                    end_pool(self.device.index or 0, self._pool)
            self._pool = None
            raise
        return graph, output

    @staticmethod
    def replay(graph, output: torch.Tensor) -> None:
        graph.replay()

    def synchronize(self) -> None:
        """Wait for the step's stream (the current one; not the staging area's copies on theirs)."""
        torch.cuda.current_stream(self.device).synchronize()

    def release(self) -> None:
        """The pool goes with the last graph that uses it (after :meth:`DecodeGraphs.drop`)."""
        self._pool = None


class ReplayFake:
    """A CPU stand-in for :class:`CudaGraphs`: ``capture`` runs ``body`` once and keeps it, ``replay`` runs it
    again and copies its result into the captured output, as a graph's replay leaves it there."""

    def __init__(self, device: torch.device | None = None):
        self.captures = 0
        self.replays = 0

    def capture(self, body: Callable[[], torch.Tensor]):
        self.captures += 1
        return body, body()

    def replay(self, graph, output: torch.Tensor) -> None:
        self.replays += 1
        output.copy_(graph())

    def synchronize(self) -> None:
        pass

    def release(self) -> None:
        pass


class DecodeGraphs:
    """The decode step's graphs of the active layout, by bucket, and what each cost and measured."""

    def __init__(self, mode: str, sizes: list[int], graphs=None):
        self.mode = mode
        self.sizes = sizes
        self.graphs = graphs
        self._captured: dict[int, tuple[object, torch.Tensor]] = {}
        self._pooled: list[object] = []
        """Every graph captured into the current pool, kept or not: the pool lives while they do."""
        self._generation = None
        self.verdicts: dict[int, bool] = {}
        """Bucket -> whether its graph runs (auto: its replay measured faster than its eager step); kept
        across layouts, so each bucket is measured once a run."""
        self.disabled: str | None = None
        """Why graphs are off for the rest of the run (a replay that did not match its warm-up)."""
        self.captures = 0
        self.capture_seconds = 0.0
        self.replays = 0

    def bucket(self, n: int) -> int | None:
        """The bucket a step of ``n`` rows runs as a graph, or None: eager (too many rows, graphs off, or its
        bucket measured slower as a graph)."""
        if self.disabled is not None:
            return None
        size = bucket_for(n, self.sizes)
        if size is None or self.verdicts.get(size, True) is False:
            return None
        return size

    def drop(self) -> None:
        """Forget every captured graph (the weights or tables they read are about to move)."""
        self._captured.clear()
        self._pooled.clear()
        self.graphs.release()

    def run(self, size: int, body: Callable[[], torch.Tensor],
            generation: Callable[[], object] = lambda: None,
            agree: Callable[[list[bool]], list[bool]] = alone) -> torch.Tensor:
        """The step ``body`` of bucket ``size``: its graph replayed (captured first when needed: an eager
        warm-up, then the capture, checked and, under ``auto``, timed), or ``body``'s result where its graph was
        refused. ``generation()`` names what graphs read besides the step buffers (the stage, its weights'
        placement, its rotary tables): a graph captured under another generation is captured again.
        ``agree(flags)``: each flag OR-ed over the ranks that step together (the tensor-parallel group)."""
        current = generation()
        if current != self._generation:
            self.drop()
            self._generation = current
        captured = self._captured.get(size)
        if captured is not None:
            self.graphs.replay(*captured)
            self.replays += 1
            return captured[1]
        output = self._capture(size, body, agree)
        after = generation()
        if after != current:  # the warm-up grew what graphs read (a rotary table): only the new graph read it
            kept = self._captured.get(size)
            self.drop()
            if kept is not None:
                self._captured[size] = kept  # it holds its own pool (the next capture starts a new one)
            self._generation = after
        return output

    def _capture(self, size: int, body: Callable[[], torch.Tensor],
                 agree: Callable[[list[bool]], list[bool]]) -> torch.Tensor:
        graphs = self.graphs
        began = time.perf_counter()
        body()                                    # the first call of a shape: lazy set-up, compilation, checks
        graphs.synchronize()
        eager_began = time.perf_counter()
        warm = body().clone()                     # the step as it runs eagerly (what the replay must match)
        graphs.synchronize()
        eager_s = time.perf_counter() - eager_began
        failure = None
        try:
            graph, output = graphs.capture(body)
        except RuntimeError as error:  # something in the step the capture refuses (a host sync, a host copy)
            failure = _first_line(error)
        if agree([failure is not None])[0]:
            return self._disable(f"capturing the decode step's graph of {size} rows failed "
                                 f"({failure or 'on another rank of its tensor-parallel group'})", warm)
        self._pooled.append(graph)
        try:
            graphs.replay(graph, output)          # the first replay (it uploads the graph), checked
            graphs.synchronize()
            checked = output.clone()
            replay_began = time.perf_counter()
            graphs.replay(graph, output)          # the timed one (it writes the same K/V again)
            graphs.synchronize()
        except RuntimeError as error:
            return self._disable(f"replaying the decode step's graph of {size} rows failed "
                                 f"({_first_line(error)})", warm)
        replay_s = time.perf_counter() - replay_began
        self.captures += 1
        self.capture_seconds += time.perf_counter() - began
        difference = row_difference(checked, warm)
        differs = not difference <= 1e-2  # also NaN
        mismatch, slower = agree([differs, replay_s >= eager_s])
        if mismatch:
            where = (f"largest difference {difference:.3g} of a row's largest value" if differs
                     else "on another rank of its tensor-parallel group")
            return self._disable(f"the decode step's graph of {size} rows did not reproduce its eager step "
                                 f"({where})", warm)
        if size not in self.verdicts:
            self.verdicts[size] = self.mode == "true" or not slower
        if self.verdicts[size]:
            self._captured[size] = (graph, output)
        return output

    def _disable(self, why: str, result: torch.Tensor) -> torch.Tensor:
        """Graphs off for the rest of the run, said once; the step's eager ``result`` stands."""
        self.disabled = f"{why}; decode steps run eagerly (model.cuda_graphs=false silences this)"
        log.warning("seesaw_ds: %s", self.disabled)
        self.drop()
        return result
