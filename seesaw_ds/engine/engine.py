"""The offline batch job: every rank runs the same step loop; global rank 0 also owns the files.

- Each instance's leader decides a step (:class:`~seesaw_ds.engine.leader.Leader`), broadcasts it over the
  instance communicator, every rank runs it (:class:`~seesaw_ds.engine.worker.Worker`), results come back
  by a gather.
- Global rank 0 is the *coordinator*: it streams the input, hands requests to instance leaders on demand
  (an instance that finishes early simply asks again, so instances share the work dynamically), writes
  every answer (whole lines, fsynced) and the metrics.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mpi4py import MPI

from seesaw_ds.config import JobConfig, layout_of
from seesaw_ds.distributed.env import anon_hugepage_bytes, cpu_affinity
from seesaw_ds.distributed.waits import settle
from seesaw_ds.engine import requests as request_io
from seesaw_ds.engine.grammar import Grammars
from seesaw_ds.engine.leader import Finished, Leader
from seesaw_ds.engine.prefixes import PrefixIndex
from seesaw_ds.engine.outputs import JsonlAppender, format_error, format_result, scan_answered, scan_error_lines
from seesaw_ds.engine.sampling import eos_token_ids
from seesaw_ds.engine.scheduler import Scheduler, prefill_pair_cost
from seesaw_ds.engine.worker import StepMessage, Worker
from seesaw_ds.kv.plan import prefix_homes
from seesaw_ds.kv.staging import StagingArea, StagingCapacityError, staging_capacity
from seesaw_ds.model.loader import read_generation_defaults
from seesaw_ds.probes import memcpy_bytes_per_second

log = logging.getLogger("seesaw_ds")

TAG_WORK, TAG_WORK_REPLY, TAG_RESULT, TAG_DONE = 11, 12, 13, 14


class JobPaths:
    """Where a job's files go."""

    def __init__(self, settings: JobConfig, run_dir: Path):
        io = settings.io
        self.output = Path(io.output) if io.output else run_dir / "outputs.jsonl"
        stem = self.output.with_suffix("")
        self.errors = Path(io.errors) if io.errors else Path(f"{stem}.errors.jsonl")
        self.metrics = Path(io.metrics) if io.metrics else Path(f"{stem}.metrics.json")
        self.timeline = Path(f"{stem}.timeline.png")


class LocalSource:
    """Requests straight from the coordinator's input stream."""

    def __init__(self, stream):
        self._stream = stream

    def take(self, count: int) -> list:
        items = []
        for item in self._stream:
            items.append(item)
            if len(items) >= count:
                break
        return items


class RemoteSource:
    """Requests asked of the coordinator (global rank 0) over MPI."""

    def __init__(self, world: MPI.Comm):
        self._world = world

    def take(self, count: int) -> list:
        self._world.send(count, dest=0, tag=TAG_WORK)
        return self._world.recv(source=0, tag=TAG_WORK_REPLY)


class Coordinator:
    """Global rank 0's file and work-sharing duties."""

    def __init__(self, world: MPI.Comm, paths: JobPaths, stream, num_instances: int, model_name: str):
        self.world = world
        self.paths = paths
        self.source = LocalSource(stream)
        self.outputs = JsonlAppender(paths.output)
        self.errors = JsonlAppender(paths.errors)
        self.model_name = model_name
        self.remaining_leaders = num_instances - 1
        self.summaries: list[dict] = []
        self.answered = 0
        self.num_errors = 0

    def write(self, finished: list[Finished], rejected: list) -> None:
        for item in finished:
            self.outputs.write(format_result(item.request, item.token_ids, item.text, item.finish_reason,
                                             model=self.model_name, logprobs=item.logprobs,
                                             prompt_logprobs=item.prompt_logprobs, token_texts=item.token_texts,
                                             samples=item.samples))
        for bad in rejected:
            self.errors.write(format_error(bad))
        if finished:
            self.outputs.flush_and_sync()
            self.answered += len(finished)
        if rejected:
            self.errors.flush_and_sync()
            self.num_errors += len(rejected)

    def serve(self) -> None:
        """Answer whatever other instance leaders have sent (non-blocking)."""
        status = MPI.Status()
        while self.world.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            payload = self.world.recv(source=source, tag=tag)
            if tag == TAG_WORK:
                self.world.send(self.source.take(payload), dest=source, tag=TAG_WORK_REPLY)
            elif tag == TAG_RESULT:
                self.write(*payload)
            elif tag == TAG_DONE:
                self.summaries.append(payload)
                self.remaining_leaders -= 1

    def wait_for_leaders(self) -> None:
        while self.remaining_leaders > 0:
            self.serve()
            time.sleep(0.01)

    def close(self) -> None:
        self.outputs.close()
        self.errors.close()


def _progress_line(leader: Leader, coordinator: Coordinator | None, total: int | None, phase: str) -> str:
    elapsed = max(leader.elapsed, 1e-9)
    done = coordinator.answered if coordinator else leader.stats.finished
    rejected = coordinator.num_errors if coordinator else 0
    rate = done / elapsed
    eta = f"{max(0, total - done - rejected) / rate:.0f}s" if total and rate > 0 else "?"
    staging = leader.scheduler.staging_used_tokens / max(1, leader.extents.capacity)
    return (f"[seesaw_ds] phase={phase} done={done}/{total if total is not None else '?'} "
            f"{f'rejected={rejected} ' if rejected else ''}req/s={rate:.2f} "
            f"in_tok/s={leader.stats.prompt_tokens / elapsed:.1f} out_tok/s={leader.stats.output_tokens / elapsed:.1f} "
            f"staging={staging:.0%} transitions={leader.scheduler.num_transitions} "
            f"compile={leader.stats.compile_seconds:.0f}s eta={eta}")


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


@dataclass
class JobResult:
    """How the job ended on this rank: metrics (global rank 0 only) and whether a signal cut it short."""

    metrics: dict | None
    preempted: bool


def run_job(settings: JobConfig, runtime, run_dir: Path, *, tokenizer=None, stop=None) -> JobResult:
    """Run the whole job on this rank; global rank 0's result carries the metrics.

    ``stop.requested`` (a signal arrived) ends the loop after the current step on the leader's decision;
    requests in flight are not written and are run again on resume.
    """
    topology = runtime.topology
    world = topology.env.world
    executor = runtime.executor
    import torch

    # Where each rank runs (launch.bind) and its threads: the metrics' "ranks", to check a binding by.
    settle(world)
    rank_cpus = world.allgather({"cpus": cpu_affinity(), "threads": torch.get_num_threads()})
    worker = Worker(executor)
    paths = JobPaths(settings, run_dir)
    coordinator = None
    leader = None
    total = None
    if topology.is_leader:
        from transformers import AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(runtime.checkpoint.path)
        generation = read_generation_defaults(runtime.checkpoint.path)
        if world.Get_rank() == 0:
            answered = scan_answered(paths.output)
            answered_before = len(answered)  # the output holds each custom_id once
            scan_answered(paths.errors, into=answered)
            skip_lines = scan_error_lines(paths.errors) if paths.errors.exists() else set()
            input_path = Path(settings.io.input)
            job_sampling = {k: v for k, v in asdict(settings.sampling).items() if v is not None}
            job_sampling.setdefault("seed", settings.seed)
            max_len = settings.model.max_model_len or runtime.checkpoint.config.max_position_embeddings
            stream = request_io.iter_requests(input_path, tokenizer, job_sampling=job_sampling,
                                              model_defaults=generation, max_model_len=max_len,
                                              vocab_size=runtime.checkpoint.dims.vocab_size, skip_ids=answered,
                                              skip_lines=skip_lines,
                                              length_switch=runtime.checkpoint.spec.length_switch)
            # One input line per answer and per rejected line: what is left is the rest of the input.
            total = _count_lines(input_path) - answered_before - len(skip_lines)
            coordinator = Coordinator(world, paths, stream, topology.num_instances,
                                      runtime.checkpoint.path.name)
            source = coordinator.source
            if answered_before or skip_lines:
                log.warning("resuming: %d requests already answered in %s are skipped%s", answered_before,
                            paths.output, f", and {len(skip_lines)} input lines already rejected in {paths.errors}"
                            if skip_lines else "")
        else:
            source = RemoteSource(world)
        layouts = runtime.layouts
        prefixes = prefix_index(settings, topology, runtime.checkpoint.dims)
        capacity = executor.staging.capacity
        prefix_cache = 0 if prefixes is None else min(capacity, settings.kv.prefix_cache_tokens or capacity // 4)
        scheduler = Scheduler(
            settings.scheduler,
            staging_tokens=capacity, device_tokens=executor.device_tokens,
            block_size=settings.kv.block_size, num_prefill_replicas=layouts["prefill"].dp,
            num_decode_replicas=layouts["decode"].dp, prefix_cache_tokens=prefix_cache,
            prefix_homes=prefix_homes(topology.layouts["prefill"].layout, runtime.checkpoint.dims,
                                      lambda rank: topology.node_of_rank[topology.instance_to_global(rank)]),
            prefill_pair_cost=_pair_cost(runtime.checkpoint.dims, executor.device.type == "cpu"))
        # One prefill step's worth of waiting prompts is all the scheduler can use per step (the leader refills
        # before every step), so the input is read that far ahead only, or kv.prefix_window_tokens ahead where
        # prompts sharing a prefix are to find each other: memory follows the work in flight and that window,
        # not the input's size (a staging area sized from host memory holds millions of tokens).
        eos_ids = eos_token_ids(tokenizer, generation)
        # Structured output: grammars over the model's whole vocabulary (the logits' width), ended by eos.
        grammars = Grammars(tokenizer, runtime.checkpoint.dims.vocab_size, eos_ids)
        leader = Leader(scheduler, capacity, tokenizer, eos_ids, source,
                        refill_tokens=read_ahead_tokens(settings, prefixes is not None), grammars=grammars,
                        prefixes=prefixes)
    comm = topology.instance_comm
    last_progress = time.perf_counter()
    while True:
        rejected: list = []
        if leader is not None:
            if coordinator:
                coordinator.serve()
            if stop is not None and stop.requested:
                message = StepMessage("stop", preempted=True)
            else:
                message = leader.next_message(rejected)
        else:
            message = None
        settle(comm)  # on a crowded node: sleep, not spin, until the leader has the step's plan
        message = comm.bcast(message, root=0)
        if message.phase == "stop":
            preempted = message.preempted
            if leader is not None:
                _deliver(coordinator, world, [], rejected)
            break
        began = time.perf_counter()
        result = worker.run_step(message)
        settle(comm)
        results = comm.gather(result, root=0)
        if leader is not None:
            finished = leader.absorb(message, results, time.perf_counter() - began)
            _deliver(coordinator, world, finished, rejected)
            if coordinator and time.perf_counter() - last_progress >= settings.io.progress_interval_s:
                print(_progress_line(leader, coordinator, total, message.phase), flush=True)
                last_progress = time.perf_counter()
    metrics = None
    if leader is not None:
        summary = _summary(leader, executor)
        if coordinator is None:
            world.send(summary, dest=0, tag=TAG_DONE)
        else:
            coordinator.wait_for_leaders()
            metrics = _metrics([summary] + coordinator.summaries, coordinator)
            metrics["ranks"] = rank_cpus
            paths.metrics.parent.mkdir(parents=True, exist_ok=True)
            paths.metrics.write_text(json.dumps(metrics, indent=2))
            _plot_timeline(leader, paths.timeline)
            print(_progress_line(leader, coordinator, total, "done"), flush=True)
            if coordinator.num_errors:
                print(f"[seesaw_ds] {coordinator.num_errors} request(s) rejected, not answered: {paths.errors} has "
                      f"one line each, with its input line and the reason", flush=True)
            coordinator.close()
    settle(world)  # global rank 0 writes the metrics and the timeline meanwhile
    preempted = any(world.allgather(preempted))
    return JobResult(metrics, preempted)


def _pair_cost(dims, cpu: bool) -> float:
    """The scheduler's weight of a prefill attention pair (:func:`~seesaw_ds.engine.scheduler.prefill_pair_cost`)
    for this model's dimensions."""
    return prefill_pair_cost(dims.num_heads, dims.head_dim, dims.hidden_size, dims.num_kv_heads,
                             dims.intermediate_size, cpu=cpu)


def prefix_index(settings: JobConfig, topology, dims) -> PrefixIndex | None:
    """The shared-prefix index when kv.prefix_sharing is on and the prefill layout can reuse a cached prefix
    (each rank reads the prefix KV its replica wrote from its own node's staging area), else None."""
    from seesaw_ds.kv.plan import reads_own_writes

    if not settings.kv.prefix_sharing:
        return None
    layout = topology.layouts["prefill"].layout
    if not reads_own_writes(layout, dims, lambda rank: topology.node_of_rank[topology.instance_to_global(rank)]):
        log.warning("kv.prefix_sharing: the prefill layout %s splits a replica's KV heads across nodes, so a "
                    "cached prefix cannot be read back where it is needed; every prompt is computed whole", layout)
        return None
    return PrefixIndex(settings.kv.block_size, settings.kv.prefix_min_tokens)


def read_ahead_tokens(settings: JobConfig, sharing: bool) -> int:
    """Prompt tokens the leader keeps read ahead of the prefill: a prefill step's, or the prefix window when
    prefixes are shared (pure)."""
    steps = settings.scheduler.max_prefill_tokens
    return max(steps, settings.kv.prefix_window_tokens) if sharing else steps


def _deliver(coordinator: Coordinator | None, world: MPI.Comm, finished: list[Finished], rejected: list) -> None:
    if not finished and not rejected:
        return
    if coordinator is not None:
        coordinator.write(finished, rejected)
    else:
        world.send((finished, rejected), dest=0, tag=TAG_RESULT)


def _summary(leader: Leader, executor) -> dict:
    stats = leader.stats
    staging = executor.staging.stats
    import resource

    return {"elapsed_time": leader.elapsed, "num_requests": stats.finished, "prompt_tokens": stats.prompt_tokens,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "hugepage_bytes": anon_hugepage_bytes(),
            "output_tokens": stats.output_tokens, "num_transitions": leader.scheduler.num_transitions,
            "grammar": {"bitmasks": stats.grammar_masks, "bitmask_seconds": stats.grammar_seconds,
                        "compiled": leader.grammars.num_compiled},
            "transition_seconds": stats.transition_seconds, "reshard_bytes": stats.reshard_bytes,
            "compile_seconds": stats.compile_seconds,
            "phase_seconds": dict(stats.phase_seconds), "scheduler": leader.scheduler.stats(),
            "kv": _kv_report(staging),
            "timeline": [asdict(record) for record in stats.timeline]}


def _kv_report(staging) -> dict:
    """Bytes and seconds of KV movement; bandwidth against memcpy measured now; the share hidden by compute.

    ``*_seconds`` is time spent copying (on the background thread), ``*_wait_seconds`` the time the step
    waited for it; what was not waited for ran behind compute.
    """
    report = {"swap_out_bytes": staging.swap_out_bytes, "swap_out_seconds": staging.swap_out_seconds,
              "swap_out_wait_seconds": staging.swap_out_wait_seconds, "swap_in_bytes": staging.swap_in_bytes,
              "swap_in_seconds": staging.swap_in_seconds, "swap_in_wait_seconds": staging.swap_in_wait_seconds,
              "remote_bytes": staging.remote_bytes, "swap_in_shared_tokens": staging.swap_in_shared_tokens,
              "memcpy_GBps": memcpy_bytes_per_second(64 << 20, threads=None, min_seconds=0.0) / 1e9}
    for direction in ("swap_out", "swap_in"):
        seconds = report[f"{direction}_seconds"]
        report[f"{direction}_GBps"] = report[f"{direction}_bytes"] / seconds / 1e9 if seconds else 0.0
        waited = min(report[f"{direction}_wait_seconds"], seconds)
        report[f"{direction}_hidden_fraction"] = 1.0 - waited / seconds if seconds else 1.0
    return report


PREFIX_METRICS = {"hits": "prefix_hits", "tokens_saved": "prefix_tokens_saved", "computed": "prefixes_computed",
                  "dropped": "prefixes_dropped"}
"""metrics["prefix"] (all instances): prompts that reused a cached prefix, prompt tokens not computed thanks to
it, prefixes computed and kept (once per prefill replica that needed one), prefixes the cache dropped."""


def _metrics(summaries: list[dict], coordinator: Coordinator) -> dict:
    elapsed = max(s["elapsed_time"] for s in summaries)
    requests = sum(s["num_requests"] for s in summaries)
    prompt = sum(s["prompt_tokens"] for s in summaries)
    output = sum(s["output_tokens"] for s in summaries)
    first = summaries[0]
    return {"elapsed_time": elapsed, "num_requests": requests, "total_num_tokens": prompt + output,
            "requests_per_second": requests / elapsed, "tokens_per_second": (prompt + output) / elapsed,
            "output_tokens_per_second": output / elapsed, "prompt_tokens": prompt, "output_tokens": output,
            "num_errors": coordinator.num_errors, "peak_rss_bytes_rank0": first["peak_rss_bytes"],
            "hugepage_bytes_rank0": first["hugepage_bytes"],
            "num_transitions": sum(s["num_transitions"] for s in summaries),
            "transition_seconds": sum(s["transition_seconds"] for s in summaries),
            "reshard_bytes": sum(s["reshard_bytes"] for s in summaries),
            "compile_seconds": max(s["compile_seconds"] for s in summaries),
            "phase_seconds": first["phase_seconds"], "kv": first["kv"], "scheduler": first["scheduler"],
            "prefix": {name: sum(s["scheduler"][key] for s in summaries) for name, key in PREFIX_METRICS.items()},
            "instances": [{k: v for k, v in s.items() if k != "timeline"} for s in summaries],
            "timeline": first["timeline"]}


def _plot_timeline(leader: Leader, path: Path) -> None:
    """The seesaw itself: staging occupancy and phase per step, as a PNG. Without matplotlib (a declared
    dependency, but a cluster's own Python may lack it) one warning and no picture: the answers and
    metrics.json are written already, and a finished job does not fail over its picture."""
    try:
        import matplotlib
    except ImportError:
        log.warning("the timeline %s is not drawn: matplotlib is not installed (pip install matplotlib); the "
                    "answers and the metrics are complete", path)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = leader.stats.timeline
    if not records:
        return
    times = [r.time for r in records]
    occupancy = [r.staging_tokens / max(1, leader.extents.capacity) for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 4.5))
    top.step(times, occupancy, where="post", color="tab:purple")
    top.set_ylabel("staging occupancy")
    top.set_ylim(0, 1.05)
    colors = ["tab:orange" if r.phase == "prefill" else "tab:blue" for r in records]
    bottom.bar(times, [r.batch_size for r in records], width=[max(r.seconds, 1e-3) for r in records],
               color=colors, align="edge")
    bottom.set_ylabel("batch size")
    bottom.set_xlabel("seconds (orange: prefill, blue: decode)")
    top.set_title("seesaw_ds timeline")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_staging_factory(settings: JobConfig):
    """Build the staging area at start-up, sized by kv.host_tokens or from free memory (decided by the
    instance leader, so every rank agrees; a size that cannot fit is a StagingCapacityError on all ranks),
    with the slots of a first prefill step (scheduler.max_prefill_tokens) touched."""
    def factory(topology, dims, dtype):
        instance_size = len(topology.instance_ranks)
        my_node = topology.env.info.node_index
        areas_on_node = len({rank // instance_size for rank, node in enumerate(topology.node_of_rank)
                             if node == my_node})
        answer = None
        if topology.is_leader:
            try:
                answer = staging_capacity(settings.kv.host_tokens, dims, dtype, areas_on_node,
                                          settings.kv.host_memory_fraction)
            except StagingCapacityError as error:
                answer = str(error)
        answer = topology.instance_comm.bcast(answer, root=0)
        if isinstance(answer, str):
            raise StagingCapacityError(answer)
        return StagingArea(topology, dims, dtype, answer, warm_tokens=settings.scheduler.max_prefill_tokens)
    return factory


def layouts_of(settings: JobConfig) -> dict:
    return {"prefill": layout_of(settings.parallel.prefill), "decode": layout_of(settings.parallel.decode)}
