"""The GPU check (run by tests/gpu/run.sh): one rank, one GPU, a few minutes; writes docs/gpu.md.

1. **The whole job in bf16** on the tiny model: ``cli.worker_main`` as a rank runs it (prefill into the host
   staging area, swap-in, decode, evictions back to staging, several phase switches); every request's tokens
   judged against the same model in float32 on the same device (``Reference``): each token the float32
   model's top on that request's own path, or a near-tie within 2 x ``LOGITS_TOLERANCE`` of it.
   transformers' bf16 ``generate`` is judged alike and reported beside it (what bf16 itself scores).
2. **The executor step by step** on the same model: prefill into staging (device -> pinned -> staging on the
   side stream), swap-in layer by layer with events, decode, eviction and a second swap-in, and a forced
   layout re-activation (the weights leave the device and come back) between decode steps; tokens judged
   again, and every step's logits within ``LOGITS_TOLERANCE`` of the float32 model's.
3. **Bandwidth** on a Llama-3-8B-shaped model with random bf16 weights (fewer layers), built on the GPU:
   pinned host-to-device and HBM bandwidth measured; a re-shard's bytes and seconds against the first; KV
   swap-out and swap-in through staging, through bounce blocks and straight from the mapped area; decode
   throughput against the HBM roofline, eager and as CUDA graphs.
4. **Decode attention**: the paged Triton kernel against the padded gather at the 8B shape.
5. **Two ranks on the one GPU**: whole jobs pp2 -> tp2 and dp2 -> tp2 under mpiexec (the carried MPICH where
   the machine has none), tokens judged as in part 1.

Without CUDA it prints one line and exits 0. ``SEESAW_GPU_CHECK_ON_CPU=1`` runs every step on the CPU at
tiny sizes (a rehearsal; the report goes to runs/gpu-rehearsal.md unless ``SEESAW_GPU_CHECK_REPORT`` says
where); ``SEESAW_GPU_CHECK_FAKE_MPI=1`` uses the single-rank MPI stand-in even where mpi4py imports.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

START_ENV = dict(os.environ)
"""The environment as run.sh gave it, before a part's rank exported its own (MASTER_PORT, RANK, ...): what the
two-rank jobs of part 5 start from (they would otherwise try to listen on this process's port)."""
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MAX_TOKENS = 12
JOB_PROMPT_LENGTHS = (5, 23, 9, 30, 14, 3, 27, 11, 18, 7, 25, 16)
STEP_PROMPT_LENGTHS = (6, 19, 33, 12)
KEPT = "<!-- tests/gpu/run.sh rewrites the page above this line and keeps what is below it. -->"
NO_CUDA_LINE = ("tests/gpu/run.sh: no CUDA device here, so the GPU check did not run "
                "(SEESAW_GPU_CHECK_ON_CPU=1 rehearses it on the CPU)")

# Llama-3-8B's shape (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256) with fewer layers.
GPU_SIZES = dict(hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                 layers=int(os.environ.get("SEESAW_GPU_CHECK_LAYERS", "8")), batches=(1, 32), context=512,
                 decode_steps=16, h2d_bytes=512 << 20, hbm_bytes=2 << 30)
CPU_SIZES = dict(hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=1000, layers=2, batches=(1, 4),
                 context=32, decode_steps=4, h2d_bytes=16 << 20, hbm_bytes=16 << 20)


# --------------------------------------------------------------------------------------------- helpers
def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(lengths, seed: int, low: int = 3, high: int = 500) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=generator).tolist() for n in lengths]


LOGITS_TOLERANCE = 2.0
"""How far a bf16 engine's logits may be from the float32 model's, on the tiny model (logits of std ~12,
seesaw_ds/model/tiny.py): bf16 computations of it measured within 0.92-1.12 of float32 at worst, RMS 0.15 (16
prompts x 12 greedy steps x 1,000 logits, the check's own prompts; transformers' bf16 0.99, seesaw_ds's with either
CPU prefill attention 0.92 / 1.12; `launch/prefill_agreement.py --model tiny`, AMD EPYC). A greedy token may
then differ from the float32 top only where the two are within 2 x this (a near-tie)."""


def _greedy(model, prompts, steps: int, device) -> tuple[list[list[int]], list]:
    """``model``'s greedy continuation of each prompt alone, and its logits at every step (float32, on the CPU)."""
    import torch

    paths, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            paths.append(out.sequences[0, len(prompt):].tolist())
            logits.append(torch.cat(out.logits).float().cpu())
    return paths, logits


def _prefix_agreement(got: list[list[int]], want: list[list[int]]) -> tuple[int, int, int]:
    """(tokens that agree up to each request's first difference, tokens, requests token-exact)."""
    agreed = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(got, want))
    return agreed, sum(map(len, want)), sum(a == b for a, b in zip(got, want))


class Reference:
    """transformers on the same device: the model in float32, what every bf16 engine is judged against (its
    greedy paths, and its logits along an engine's own path), and in bf16 (judged the same way: what a bf16
    computation of the same model scores)."""

    def __init__(self, model_dir: Path, prompts, steps: int, device):
        import torch
        from transformers import AutoModelForCausalLM

        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (torch's default; TF32 is not)
        torch.backends.cudnn.allow_tf32 = False
        self.prompts, self.device = prompts, device
        load = lambda dtype: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()  # noqa: E731
        bf16 = load(torch.bfloat16)
        self.bf16_paths, bf16_logits = _greedy(bf16, prompts, steps, device)
        del bf16
        self.model = load(torch.float32)
        self.paths, _ = _greedy(self.model, prompts, steps, device)
        self.transformers_bf16 = self.judge(self.bf16_paths, bf16_logits)

    def forced(self, paths) -> list:
        """The float32 model's logits at every step of each path (teacher forcing: the path is its input)."""
        import torch

        out = []
        with torch.no_grad():
            for prompt, path in zip(self.prompts, paths):
                ids = torch.tensor([prompt + path[:-1]], device=self.device)
                out.append(self.model(ids).logits[0, len(prompt) - 1:].float().cpu())
        return out

    def judge(self, paths, logits=None) -> dict:
        """Every token of ``paths`` against the float32 model's logits on that same path: its top, or a near-tie
        (within 2 x LOGITS_TOLERANCE of the top: two logits each off by the tolerance can swap); ``logits`` (per
        request [steps, vocab]), when given, within LOGITS_TOLERANCE of float32's at every step. Also the tokens
        before each request's first difference from the float32 greedy path and from transformers' bf16 one
        (figures only: after a near-tie, greedy paths drift apart)."""
        import torch

        forced = self.forced(paths)
        off_top, worst, error = 0, 0.0, None
        for path, fp32 in zip(paths, forced):
            margin = fp32.max(-1).values - fp32.gather(-1, torch.tensor(path)[:, None])[:, 0]
            off_top += int((margin > 0).sum())
            worst = max(worst, float(margin.max()))
        if logits is not None:
            error = max(float((own.float() - fp32).abs().max()) for own, fp32 in zip(logits, forced))
        return {"requests": len(paths), "steps": sum(map(len, paths)), "off_top": off_top, "worst_margin": worst,
                "max_logits_error": error, "fp32_prefix": _prefix_agreement(paths, self.paths),
                "bf16_prefix": _prefix_agreement(paths, self.bf16_paths),
                "ok": worst <= 2 * LOGITS_TOLERANCE and (error is None or error <= LOGITS_TOLERANCE)}


def _line(judged: dict) -> str:
    agreed, total, exact = judged["fp32_prefix"]
    text = (f"{judged['steps'] - judged['off_top']}/{judged['steps']} tokens the float32 model's top on their own "
            f"path, the others within {judged['worst_margin']:.3f} of it")
    if judged["max_logits_error"] is not None:
        text += f", logits within {judged['max_logits_error']:.3f} of float32's"
    return (text + f"; {agreed}/{total} tokens ({exact}/{judged['requests']} requests) as float32 greedy before a "
            f"first difference, {judged['bf16_prefix'][0]}/{total} as transformers' bf16")


# --------------------------------------------------------------------------------------------- part 1
def whole_job(work: Path, device) -> dict:
    """cli.worker_main as the only rank: the real job, bf16, a staging area and a device tier small enough
    for several prefill/decode cycles and evictions."""
    from seesaw_ds import cli
    from seesaw_ds.model.tiny import make_tiny_model

    model_dir = make_tiny_model(work / "tiny", "llama", num_layers=5)
    prompts = _prompts(JOB_PROMPT_LENGTHS, seed=7)
    input_path = work / "job-input.jsonl"
    input_path.write_text("".join(json.dumps({"custom_id": f"req-{i}", "prompt_token_ids": p}) + "\n"
                                  for i, p in enumerate(prompts)))
    began = time.perf_counter()
    reference = Reference(model_dir, prompts, MAX_TOKENS, device)
    reference_s = time.perf_counter() - began
    output = work / "job" / "out.jsonl"
    notes = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the timeline PNG needs it; the job itself does not
        from seesaw_ds.engine import engine

        engine._plot_timeline = lambda *args, **kwargs: None
        notes.append("matplotlib absent: the timeline PNG was skipped")
    argv = [f"model.path={model_dir}", "model.dtype=bfloat16", f"io.input={input_path}", f"io.output={output}",
            "launch.nproc=1", "parallel=single", f"sampling.max_tokens={MAX_TOKENS}", "sampling.temperature=0",
            "sampling.ignore_eos=true", "kv.host_tokens=80", "kv.device_tokens=64", "kv.block_size=4",
            "scheduler.max_prefill_tokens=48", f"run_dir={work / 'job'}"]
    began = time.perf_counter()
    code = cli.worker_main(argv)
    job_s = time.perf_counter() - began
    if code != 0:
        raise RuntimeError(f"the job exited {code}")
    records = {json.loads(line)["custom_id"]: json.loads(line) for line in output.read_text().splitlines()}
    got = [records[f"req-{i}"]["token_ids"] for i in range(len(prompts))]
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    return {"agreement": reference.judge(got), "transformers_bf16": reference.transformers_bf16, "job_s": job_s,
            "reference_s": reference_s, "notes": notes,
            "transitions": metrics["num_transitions"], "evictions": metrics["scheduler"]["evictions"],
            "kv": metrics["kv"], "output_tokens_per_second": metrics["output_tokens_per_second"]}


# --------------------------------------------------------------------------------------------- part 2
def _start(model_dir: Path, staging_tokens: int, device_tokens: int, block_size: int = 16):
    from seesaw_ds import runtime as runtime_mod
    from seesaw_ds.distributed.layout import Layout
    from seesaw_ds.kv.staging import StagingArea

    return runtime_mod.start(str(model_dir), {"prefill": Layout(), "decode": Layout()}, device_tokens=device_tokens,
                             block_size=block_size, dtype="bfloat16", cuda_graphs="true",
                             staging_factory=lambda topology, dims, dtype: StagingArea(topology, dims, dtype,
                                                                                        staging_tokens))


class Sequences:
    """Sequences driven through the executor by hand, as the leader would (``keep_logits``: each step's
    logits kept per sequence, float32 on the CPU, in ``logits``)."""

    def __init__(self, runtime, prompts, max_new: int, keep_logits: bool = False):
        from seesaw_ds.kv.staging import ExtentAllocator

        self.rt = runtime
        self.prompts = prompts
        self.max_new = max_new
        self.extents = ExtentAllocator(runtime.executor.staging.capacity)
        self.tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        self.logits: dict[int, list] | None = {i: [] for i in range(len(prompts))} if keep_logits else None
        self.staged = {}
        self._swapping: list = []  # staged copies being read by a swap-in: their extents are freed after it

    def length(self, seq: int) -> int:
        return len(self.prompts[seq]) + len(self.tokens[seq])

    def _staged(self, seq: int, writer: str):
        from seesaw_ds.kv.staging import StagedSeq

        num_tokens = self.length(seq) - (1 if self.tokens[seq] else 0)  # the last token has no KV yet
        extents = self.extents.allocate(num_tokens)
        return StagedSeq(seq_id=seq, extents=extents, num_tokens=num_tokens, writer=writer, writer_replica=0,
                         final_tokens=len(self.prompts[seq]) + self.max_new)

    def prefill_to_staging(self, seqs) -> None:
        from seesaw_ds.model.executor import ForwardPlan, SeqWork

        executor = self.rt.executor
        executor.activate("prefill")
        works = []
        for seq in seqs:
            self.staged[seq] = self._staged(seq, "prefill")
            works.append(SeqWork(seq, 0, self.prompts[seq], 0, staging_extents=self.staged[seq].extents))
        ids, logits = executor.forward(ForwardPlan("prefill", works, sink="staging"))
        executor.staging.finish_writes()
        self._take(ids, logits)

    def _take(self, ids, logits) -> None:
        for seq, token in zip(ids, logits.argmax(-1).tolist()):
            self.tokens[seq].append(token)
        if self.logits is not None:
            for seq, row in zip(ids, logits.float().cpu()):
                self.logits[seq].append(row)

    def swap_in(self, seqs):
        executor = self.rt.executor
        executor.activate("decode")
        swap = executor.staging.swap_in([self.staged[s] for s in seqs], "decode", executor.cache("decode"))
        self._swapping = [self.staged.pop(seq) for seq in seqs]
        return swap

    def finish(self, swap) -> None:
        swap.finish()
        for staged in self._swapping:
            self.extents.free(staged.extents)
        self._swapping = []

    def decode(self, seqs, swap=None) -> None:
        from seesaw_ds.model.executor import ForwardPlan, SeqWork

        executor = self.rt.executor
        works = [SeqWork(s, 0, [self.tokens[s][-1]], self.length(s) - 1) for s in seqs]
        ids, logits = executor.forward(ForwardPlan("decode", works), ready=swap.wait if swap else None)
        if swap is not None:
            self.finish(swap)
        self._take(ids, logits)

    def evict(self, seqs) -> None:
        for seq in seqs:
            self.staged[seq] = self._staged(seq, "decode")
        self.rt.executor.evict([self.staged[s] for s in seqs], "decode")


def _graphs_used(executor) -> str:
    """What the decode step's CUDA graphs did in a run, in words."""
    graphs = executor.graphs
    if graphs is None:
        return "off (model.cuda_graphs resolved to false here)"
    if graphs.disabled:
        return f"turned off: {graphs.disabled}"
    return (f"{graphs.captures} captures ({graphs.capture_seconds:.2f} s), {graphs.replays} replays, kept for "
            f"buckets {sorted(size for size, kept in graphs.verdicts.items() if kept)}")


def executor_steps(work: Path, device) -> dict:
    import torch

    model_dir = work / "tiny"
    prompts = _prompts(STEP_PROMPT_LENGTHS, seed=11)
    reference = Reference(model_dir, prompts, MAX_TOKENS, device)
    rt = _start(model_dir, staging_tokens=256, device_tokens=256, block_size=4)
    seqs = Sequences(rt, prompts, MAX_TOKENS, keep_logits=True)
    everyone = list(range(len(prompts)))
    seqs.prefill_to_staging(everyone)
    swap = seqs.swap_in(everyone)
    seqs.decode(everyone, swap)                     # the first decode step overlaps the swap-in
    for _ in range(3):
        seqs.decode(everyone)
    stage = rt.executor.stages["decode"]            # a forced re-activation: weights off the device and back
    stage.to_host()
    began = time.perf_counter()
    moved = stage.to_device()
    reactivation_s = time.perf_counter() - began
    for _ in range(3):
        seqs.decode(everyone)
    seqs.evict(everyone[:2])                        # device -> pinned -> staging, then back in
    swap = seqs.swap_in(everyone[:2])
    seqs.decode(everyone, swap)
    while len(seqs.tokens[0]) < MAX_TOKENS:
        seqs.decode(everyone)
    stats = rt.executor.staging.stats
    result = {"agreement": reference.judge([seqs.tokens[i] for i in everyone],
                                           [torch.stack(seqs.logits[i]) for i in everyone]),
              "transformers_bf16": reference.transformers_bf16, "reactivation_bytes": moved,
              "reactivation_s": reactivation_s, "swap_in_bytes": stats.swap_in_bytes,
              "swap_out_bytes": stats.swap_out_bytes, "graphs": _graphs_used(rt.executor)}
    rt.close()
    return result


# --------------------------------------------------------------------------------------------- part 3
def _build_random_model(directory: Path, sizes: dict, device) -> Path:
    """A Llama with Llama-3-8B's shape (``sizes['layers']`` layers), random bf16 weights made on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
                         num_key_value_heads=sizes["kv_heads"], intermediate_size=sizes["intermediate"],
                         vocab_size=sizes["vocab"], num_hidden_layers=sizes["layers"], rope_theta=500000.0,
                         max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # on meta: nothing allocated yet
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    return directory


def _hbm_GBps(nbytes: int, device) -> float:
    """Device memory bandwidth: a device-to-device copy reads and writes ``nbytes`` (best of five)."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        _synchronize(device)
        began = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        best = min(best, time.perf_counter() - began)
    return 2 * nbytes / best / 1e9


def bandwidth(work: Path, device, sizes: dict) -> dict:
    import torch

    from seesaw_ds.backends import deepspeed as backend

    began = time.perf_counter()
    model_dir = _build_random_model(work / "llama3-8b-shaped", sizes, device)
    build_s = time.perf_counter() - began
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    h2d = backend.host_to_device_GBps(sizes["h2d_bytes"])
    hbm = _hbm_GBps(sizes["hbm_bytes"], device)
    batch, context, steps = max(sizes["batches"]), sizes["context"], sizes["decode_steps"]
    max_new = 2 * len(sizes["batches"]) * (steps + 3) + 2  # sequence 0 decodes in every batch size, twice
    began = time.perf_counter()
    rt = _start(model_dir, staging_tokens=batch * (context + max_new), device_tokens=batch * (context + max_new + 16))
    start_s = time.perf_counter() - began
    executor = rt.executor
    first = executor.activate("prefill")            # the first activation: every weight onto the device
    stage = executor.stages["prefill"]
    reshard = []
    for _ in range(3):                              # forced re-activations: the weights leave and come back
        stage.to_host()
        _synchronize(device)
        began = time.perf_counter()
        moved = stage.to_device()
        reshard.append((moved, time.perf_counter() - began))
    reshard_bytes, reshard_s = min(reshard, key=lambda item: item[1])
    prompts = _prompts([context] * batch, seed=3, high=sizes["vocab"])
    seqs = Sequences(rt, prompts, max_new)
    everyone = list(range(batch))
    stats = executor.staging.stats
    _synchronize(device)
    began = time.perf_counter()
    seqs.prefill_to_staging(everyone)
    _synchronize(device)
    prefill_s = time.perf_counter() - began
    out_bytes, out_s = stats.swap_out_bytes, stats.swap_out_seconds
    area = executor.staging
    mapped = area.mapped                            # the default path (None: the area has no device mapping)
    swaps = {}
    for path, view in (("bounce", None), ("mapped", mapped)):
        if path == "mapped" and view is None:
            continue
        area.mapped = view
        for direction in ("in", "out"):             # staged -> device -> staged again, alone: each its own bandwidth
            moved, spent = (stats.swap_in_bytes, stats.swap_in_seconds) if direction == "in" else \
                (stats.swap_out_bytes, stats.swap_out_seconds)
            _synchronize(device)
            began = time.perf_counter()
            if direction == "in":
                seqs.finish(seqs.swap_in(everyone))
            else:
                seqs.evict(everyone)                # device tier -> staging (decode's eviction)
            _synchronize(device)
            wall = time.perf_counter() - began
            after = (stats.swap_in_bytes, stats.swap_in_seconds) if direction == "in" else \
                (stats.swap_out_bytes, stats.swap_out_seconds)
            swaps[(path, direction)] = (after[0] - moved, after[1] - spent, wall)
    area.mapped = mapped
    seqs.finish(seqs.swap_in(everyone))             # back in the device tier for the decode steps
    decode = {}
    shard_bytes = stage.shard_bytes
    dims = rt.checkpoint.dims
    kv_token_bytes = dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * 2
    graphs_made = _graph_stand_in(executor, device)
    for size in sorted(sizes["batches"]):
        group = everyone[:size]
        decode[size] = {}
        for mode, graphs in (("eager", None), ("graphs", graphs_made)):
            executor.graphs = graphs
            for _ in range(3):                      # warm-up: the new batch shape's kernels, the graph's capture
                seqs.decode(group)
            _synchronize(device)
            began = time.perf_counter()
            for _ in range(steps):
                seqs.decode(group)
            _synchronize(device)
            seconds = (time.perf_counter() - began) / steps
            context_now = sum(seqs.length(s) for s in group)
            step_bytes = shard_bytes + context_now * kv_token_bytes
            decode[size][mode] = {"step_s": seconds, "tokens_per_s": size / seconds, "step_bytes": step_bytes,
                                  "roofline_tokens_per_s": size / (step_bytes / (hbm * 1e9))}
    graphs_line = _graphs_used(executor)
    rt.close()
    return {"build_s": build_s, "start_s": start_s, "h2d_GBps": h2d, "hbm_GBps": hbm,
            "first_activation": (first.bytes_moved, first.seconds), "reshard_bytes": reshard_bytes,
            "reshard_s": reshard_s, "prefill_tokens": batch * context, "prefill_s": prefill_s,
            "swap_out": (out_bytes, out_s), "swaps": swaps, "decode": decode,
            "shard_bytes": shard_bytes, "layers": dims.num_layers, "graphs": graphs_line}


def _graph_stand_in(executor, device):
    """Decode graphs kept for every bucket (``true``: timed whatever ``auto`` would decide), CUDA's or, in the
    CPU rehearsal, the replaying stand-in."""
    from seesaw_ds.model import graphs

    backend = graphs.CudaGraphs(device) if device.type == "cuda" else graphs.ReplayFake()
    return graphs.DecodeGraphs("true", graphs.buckets(executor.step_buffers().max_seqs), backend)


def attention_kernel(device, sizes: dict) -> dict:
    """One decode attention call of the 8B shape over a fragmented paged cache: the paged Triton kernel (CUDA)
    against the padded gather it replaces, time per call, bytes each must read, and their largest difference."""
    import torch

    from seesaw_ds.model import device_attention
    from seesaw_ds.model.attention import _grouped

    heads, kv_heads, dim = sizes["heads"], sizes["kv_heads"], sizes["hidden"] // sizes["heads"]
    block, dtype = 16, torch.bfloat16
    generator = torch.Generator(device="cpu").manual_seed(5)
    rows = {}
    for batch, context in ((max(sizes["batches"]), sizes["context"]), (1, 8 * sizes["context"])):
        blocks_each = -(-context // block)
        total = batch * blocks_each + 8
        keys = torch.randn(total * block, kv_heads, dim, generator=generator).to(device, dtype)
        values = torch.randn(total * block, kv_heads, dim, generator=generator).to(device, dtype)
        table = torch.randperm(total, generator=generator)[:batch * blocks_each].view(batch, blocks_each).to(device)
        lengths = torch.full((batch,), context, dtype=torch.long, device=device)
        query = torch.randn(batch, heads, dim, generator=generator).to(device, dtype)
        scale = dim ** -0.5

        def padded():
            shape = (-1, block, kv_heads, dim)
            k = keys.view(shape)[table].flatten(1, 2).transpose(1, 2)
            v = values.view(shape)[table].flatten(1, 2).transpose(1, 2)
            valid = torch.arange(blocks_each * block, device=device)[None, :] < lengths[:, None]
            return _grouped(query[:, :, None], k, v, valid, scale)[:, :, 0]

        def paged():
            return device_attention.decode(query, keys, values, table, lengths, context, block, scale, None, None)

        def timed(call) -> float:
            for _ in range(3):
                call()
            _synchronize(device)
            began = time.perf_counter()
            for _ in range(20):
                call()
            _synchronize(device)
            return (time.perf_counter() - began) / 20

        kv_bytes = 2 * batch * context * kv_heads * dim * keys.element_size()
        row = {"batch": batch, "context": context, "kv_bytes": kv_bytes, "padded_s": timed(padded)}
        out = paged()
        if out is not None:
            row["paged_s"] = timed(paged)
            row["max_abs_diff"] = (out.float() - padded().float()).abs().max().item()
        rows[f"{batch}x{context}"] = row
    return {"rows": rows, "shape": (heads, kv_heads, dim, block)}


# --------------------------------------------------------------------------------------------- part 5
#: The two-rank jobs: both layouts of each pair on the same two ranks, which share the one GPU.
TWO_RANK_JOBS = {"pp2 -> tp2": ["parallel=seesaw_pp2_tp2"],
                 "dp2 -> tp2": ["parallel.prefill={dp: 2, tp: 1, pp: 1}", "parallel.decode={dp: 1, tp: 2, pp: 1}"]}


def _mpiexec() -> str | None:
    """The MPI launcher: on PATH (run.sh puts the carried MPICH there), else beside this Python."""
    found = shutil.which("mpiexec")
    beside = Path(sys.executable).parent / "mpiexec"
    return found or (str(beside) if beside.exists() else None)


def two_ranks(work: Path, device) -> dict:
    """Two ranks on the one device, as ``launch/run.py`` starts them under mpiexec: the multi-rank CUDA path
    (device groups on gloo through host memory, since NCCL takes one rank a device; re-shards between two
    layouts; KV re-sharded through staging). Each job's tokens judged against the float32 model as in part 1."""
    import subprocess

    from seesaw_ds.bench import process
    from seesaw_ds.model.tiny import make_tiny_model

    mpiexec = _mpiexec()
    if mpiexec is None:
        raise RuntimeError("no MPI launcher here: carry tests/gpu/wheels with its MPICH wheel "
                           "(tests/gpu/fetch_wheels.sh), which run.sh puts on PATH")
    model_dir = work / "tiny"
    if not model_dir.exists():
        make_tiny_model(model_dir, "llama", num_layers=5)
    prompts = _prompts(JOB_PROMPT_LENGTHS, seed=7)
    input_path = work / "two-ranks-input.jsonl"
    input_path.write_text("".join(json.dumps({"custom_id": f"req-{i}", "prompt_token_ids": p}) + "\n"
                                  for i, p in enumerate(prompts)))
    reference = Reference(model_dir, prompts, MAX_TOKENS, device)
    jobs = {}
    for index, (name, layout) in enumerate(TWO_RANK_JOBS.items()):
        run_dir = work / f"two-ranks-{index}"
        output = run_dir / "out.jsonl"
        command = [sys.executable, str(REPO / "launch" / "run.py"), f"model.path={model_dir}", "model.dtype=bfloat16",
                   f"io.input={input_path}", f"io.output={output}", "launch.nproc=2", f"launch.mpiexec={mpiexec}",
                   *layout, f"sampling.max_tokens={MAX_TOKENS}", "sampling.temperature=0", "sampling.ignore_eos=true",
                   "kv.host_tokens=160", "kv.device_tokens=64", "kv.block_size=4", "scheduler.max_prefill_tokens=48",
                   f"run_dir={run_dir}"]
        began = time.perf_counter()
        # each job its share of the time the check has left, and killed with mpiexec and its ranks when over it
        # (a rerun on the same warm machine must not start beside ranks still holding the GPU)
        limit = max(10.0, min(TWO_RANK_TIMEOUT_S, (DEADLINE[0] - began) / (len(TWO_RANK_JOBS) - index)))
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "job.log"
        with open(log_path, "w") as log_file:
            try:
                code = process.call(command, timeout=limit, stdout=log_file, stderr=subprocess.STDOUT, env=START_ENV)
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.perf_counter() - began
        said = log_path.read_text(errors="replace")
        if code != 0:
            why = f"killed after its {limit:.0f} s" if code is None else f"exit {code}"
            jobs[name] = {"error": f"{why}: " + " | ".join(said.strip().splitlines()[-6:]), "job_s": seconds}
            continue
        records = {json.loads(line)["custom_id"]: json.loads(line) for line in output.read_text().splitlines()}
        metrics = json.loads(output.with_suffix(".metrics.json").read_text())
        jobs[name] = {"agreement": reference.judge([records[f"req-{i}"]["token_ids"] for i in range(len(prompts))]),
                      "job_s": seconds, "transitions": metrics["num_transitions"],
                      "shared_device": "share" in said and "through host memory" in said}
    ok = all("agreement" in job and job["agreement"]["ok"] for job in jobs.values())
    return {"jobs": jobs, "agreement": {"ok": ok}, "mpiexec": mpiexec}


TWO_RANK_TIMEOUT_S = 150
DEADLINE = [float("inf")]
"""When the check must be done (main: run.sh's limit less a margin for the report), on perf_counter's clock."""


def _two_rank_lines(part: dict) -> list[str]:
    lines = [f"- tiny Llama (5 layers), {len(JOB_PROMPT_LENGTHS)} requests x {MAX_TOKENS} greedy tokens, bf16, "
             f"`launch/run.py launch.nproc=2` under `{part['mpiexec']}`, both ranks on the one device"]
    for name, job in part["jobs"].items():
        if "error" in job:
            lines.append(f"- {name}: **FAILED** after {job['job_s']:.0f} s: {job['error']}")
            continue
        verdict = "PASS" if job["agreement"]["ok"] else "FAIL"
        shared = "; the device groups on gloo through host memory, said at start" if job["shared_device"] else ""
        lines.append(f"- {name}: {job['transitions']} phase switches, {job['job_s']:.0f} s{shared}; against "
                     f"transformers in float32: {_line(job['agreement'])} — **{verdict}**")
    return lines


# --------------------------------------------------------------------------------------------- report
def _attention_lines(part: dict, hbm_GBps: float | None) -> list[str]:
    heads, kv_heads, dim, block = part["shape"]
    lines = [f"{heads} query heads over {kv_heads} KV heads of {dim}, bf16, block size 16, a shuffled block table; "
             "one layer's call.", "",
             "| batch x context | KV bytes | padded gather us | paged kernel us | paged GB/s | of HBM | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for name, row in part["rows"].items():
        if "paged_s" not in row:
            lines.append(f"| {name} | {row['kv_bytes']} | {row['padded_s'] * 1e6:.0f} | (CUDA only) | | | |")
            continue
        rate = row["kv_bytes"] / row["paged_s"] / 1e9
        share = f"{rate / hbm_GBps * 100:.0f}%" if hbm_GBps else "-"
        lines.append(f"| {name} | {row['kv_bytes']} | {row['padded_s'] * 1e6:.0f} | {row['paged_s'] * 1e6:.0f} | "
                     f"{rate:.0f} | {share} | {row['max_abs_diff']:.3g} |")
    return lines


def _gbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.1f}" if seconds else "-"


def _job_lines(job: dict) -> list[str]:
    kv = job["kv"]
    verdict = "PASS" if job["agreement"]["ok"] else "FAIL"
    return [f"- tiny Llama (5 layers), {len(JOB_PROMPT_LENGTHS)} requests x {MAX_TOKENS} greedy tokens, "
            f"`kv.host_tokens=80 kv.device_tokens=64`: {job['transitions']} phase switches, {job['evictions']} "
            f"evictions, swap-out {kv['swap_out_bytes']} B, swap-in {kv['swap_in_bytes']} B; job {job['job_s']:.1f} s",
            f"- against transformers in float32 (same device): {_line(job['agreement'])} — **{verdict}**",
            f"- transformers `generate` in bf16, judged alike: {_line(job['transformers_bf16'])}",
            *(f"- note: {note}" for note in job["notes"])]


def _steps_lines(steps: dict) -> list[str]:
    verdict = "PASS" if steps["agreement"]["ok"] else "FAIL"
    return [f"- prefill -> staging -> swap-in (overlapping the first decode step) -> decode -> weights off the device "
            f"and back ({steps['reactivation_bytes']} B in {steps['reactivation_s'] * 1e3:.1f} ms) -> decode -> "
            f"evict two sequences -> swap them in again -> decode",
            f"- against transformers in float32: {_line(steps['agreement'])} — **{verdict}**",
            f"- CUDA graphs (`model.cuda_graphs=true`, so the steps above replay them): {steps['graphs']}",
            f"- transformers `generate` in bf16, judged alike: {_line(steps['transformers_bf16'])}"]


SWAP_PATHS = {"bounce": "through a pinned bounce block, one copy a layer",
              "mapped": "device copies straight from the mapped pinned area"}


def _bandwidth_lines(band: dict, h2d_bytes: int) -> list[str]:
    h2d = band["h2d_GBps"]
    moved, seconds = band["first_activation"]
    reshard_bytes, reshard_s = band["reshard_bytes"], band["reshard_s"]
    out_bytes, out_s = band["swap_out"]
    share = f"{reshard_bytes / reshard_s / 1e9 / h2d * 100:.0f}% of H2D" if h2d and reshard_s else "-"
    lines = [f"{band['layers']} layers, {band['shard_bytes'] / 2**30:.2f} GiB of weights; built on the device and "
             f"saved in {band['build_s']:.0f} s, loaded into pinned host memory in {band['start_s']:.0f} s.", "",
             "| what | bytes | seconds | GB/s | against |", "|---|---|---|---|---|",
             f"| pinned host -> device, measured | {h2d_bytes} | | {h2d:.1f} | |" if h2d
             else "| pinned host -> device | | | (no device) | |",
             f"| HBM (device copy, read + write), measured | | | {band['hbm_GBps']:.0f} | |",
             f"| first activation (every weight onto the device) | {moved} | {seconds:.3f} | {_gbps(moved, seconds)} "
             f"| {h2d or 0:.1f} H2D |",
             f"| re-shard: weights back onto the device (best of 3) | {reshard_bytes} | {reshard_s:.3f} | "
             f"{_gbps(reshard_bytes, reshard_s)} | {share} |",
             f"| KV swap-out ({band['prefill_tokens']} prompt tokens, prefill -> staging, default path) | {out_bytes} | "
             f"{out_s:.3f} | {_gbps(out_bytes, out_s)} | copy thread, behind a {band['prefill_s']:.2f} s prefill |",
             *(f"| KV swap-{direction} ({'staging -> device' if direction == 'in' else 'device -> staging'}, "
               f"{SWAP_PATHS[path]}) | {moved} | {spent:.3f} | {_gbps(moved, spent)} | {h2d or 0:.1f} H2D; "
               f"wall {wall:.3f} s |" for (path, direction), (moved, spent, wall) in band["swaps"].items()), "",
             "| decode batch | step | step ms | tokens/s | bytes read per step | HBM roofline tokens/s | of roofline |",
             "|---|---|---|---|---|---|---|"]
    for size, modes in band["decode"].items():
        for mode, row in modes.items():
            share = row["tokens_per_s"] / row["roofline_tokens_per_s"] * 100
            lines.append(f"| {size} | {mode} | {row['step_s'] * 1e3:.2f} | {row['tokens_per_s']:.0f} | "
                         f"{row['step_bytes']} | {row['roofline_tokens_per_s']:.0f} | {share:.0f}% |")
    return lines + ["", "The roofline reads every weight of the layout once and every sequence's KV once per step at "
                    "the measured HBM bandwidth. `graphs`: the decode step as CUDA graphs (`model.cuda_graphs=true`; "
                    f"{band['graphs']}); `eager`: without."]


SECTIONS = (("job", "1. The whole job, bf16, one rank"),
            ("steps", "2. The executor step by step: staging, swap-in, eviction, a forced re-activation"),
            ("bandwidth", "3. Bandwidth: a Llama-3-8B-shaped model, random bf16 weights"),
            ("attention", "4. Decode attention: the paged Triton kernel against the padded gather"),
            ("two_ranks", "5. Two ranks sharing the one GPU: whole jobs, pp2 -> tp2 and dp2 -> tp2"))


def section_lines(name: str, parts: dict, on_cpu: bool) -> list[str]:
    """Part ``name``'s lines of the report: its figures, its failure, or that the check never reached it."""
    if name not in parts:
        return ["- **not reached**: the check ended before this part (its time limit, run.sh's "
                "`SEESAW_GPU_CHECK_TIMEOUT_S`, or a crash)"]
    part = parts[name]
    if not isinstance(part, dict):
        return [f"- **FAILED**: {part}"]
    band = parts.get("bandwidth")
    render = {"job": _job_lines, "steps": _steps_lines,
              "bandwidth": lambda p: _bandwidth_lines(p, (CPU_SIZES if on_cpu else GPU_SIZES)["h2d_bytes"]),
              "attention": lambda p: _attention_lines(p, band.get("hbm_GBps") if isinstance(band, dict) else None),
              "two_ranks": _two_rank_lines}[name]
    return render(part)


def write_report(path: Path, header: dict, parts: dict, on_cpu: bool) -> None:
    """The page: written after every part, so that a check stopped by its time limit still leaves what it measured."""
    lines = ["# GPU check", ""]
    if on_cpu:
        lines += ["**A CPU rehearsal** (`SEESAW_GPU_CHECK_ON_CPU=1`, tiny sizes): every step of "
                  "`bash tests/gpu/run.sh` ran, but the figures say nothing about a GPU.", ""]
    lines += [f"`bash tests/gpu/run.sh` on {header['device']}, {header['when']}: torch {header['torch']} "
              f"(CUDA {header['cuda']}), transformers {header['transformers']}, deepspeed {header['deepspeed']}, "
              f"Python {header['python']}, MPI: {header['mpi']}, DeepSpeed accelerator: {header['accelerator']}. "
              f"Total {header['total_s']:.0f} s ({header['parts']}). Attention: {header['attention']}.", ""]
    for name, title in SECTIONS:
        lines += [f"## {title}", "", *section_lines(name, parts, on_cpu), ""]
    lines += ["---", "Written by `bash tests/gpu/run.sh` (what each part runs: `tests/gpu/check.py`; the wheels a "
              "GPU machine without DeepSpeed or Hydra needs: `tests/gpu/fetch_wheels.sh`; NCCL, Slurm and a first "
              "multi-GPU run: `docs/cluster.md`)."]
    kept = path.read_text().partition(KEPT)[2] if path.exists() and KEPT in path.read_text() else ""
    if kept:  # the page's hand-written part (how to run it, what was learnt) stays under the figures
        lines += ["", KEPT + kept.rstrip("\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _summarise(header: dict, durations: dict, device, began: float) -> None:
    """The header's running totals and which attention (and CPU extension) the parts so far used."""
    from seesaw_ds.model import device_attention, kernels

    header["attention"] = f"{device_attention.describe(device)}; the CPU kernels' extension: {kernels.state()}"
    header["total_s"] = time.perf_counter() - began
    header["parts"] = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in durations.items())


def main(argv: list[str]) -> int:
    """``--probe``: exit 0 where the check can run, else print the one line and exit 10 (run.sh: exit 0)."""
    began = time.perf_counter()
    DEADLINE[0] = began + float(os.environ.get("SEESAW_GPU_CHECK_TIMEOUT_S", 360)) - 20
    on_cpu = os.environ.get("SEESAW_GPU_CHECK_ON_CPU") == "1"
    import torch

    if not torch.cuda.is_available() and not on_cpu:
        print(NO_CUDA_LINE, flush=True)
        return 10 if "--probe" in argv else 0
    if "--probe" in argv:
        return 0
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import single_rank_mpi

    mpi = single_rank_mpi.install(force=os.environ.get("SEESAW_GPU_CHECK_FAKE_MPI") == "1")
    import deepspeed
    import transformers

    from seesaw_ds.backends import deepspeed as backend

    device = torch.device("cuda", 0) if not on_cpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = CPU_SIZES if on_cpu else GPU_SIZES
    report = Path(os.environ.get("SEESAW_GPU_CHECK_REPORT")
                  or (REPO / "runs" / "gpu-rehearsal.md" if on_cpu else REPO / "docs" / "gpu.md"))
    # on the repository's disk (the 8B-shaped checkpoint is GBs; /tmp may be small), removed at the end
    (REPO / "runs").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=os.environ.get("SEESAW_GPU_CHECK_WORK", REPO / "runs")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    header = {"device": name,
              "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__,
              "deepspeed": deepspeed.__version__ + (" (from tests/gpu/wheels)" if ".deps" in deepspeed.__file__ else ""),
              "python": platform.python_version(), "mpi": mpi, "accelerator": backend.accelerator_name()}
    print(f"[gpu check] {header['device']}, MPI: {mpi}, report -> {report}", flush=True)
    parts: dict = {}
    durations: dict[str, float] = {}
    for name, run in (("job", lambda: whole_job(work, device)), ("steps", lambda: executor_steps(work, device)),
                      ("bandwidth", lambda: bandwidth(work, device, sizes)),
                      ("attention", lambda: attention_kernel(device, sizes)),
                      ("two_ranks", lambda: two_ranks(work, device))):
        step_began = time.perf_counter()
        try:
            parts[name] = run()
        except (Exception, SystemExit) as error:  # noqa: BLE001 - a failed part is reported; the others run
            traceback.print_exc()
            parts[name] = f"{type(error).__name__}: {error}"
        durations[name] = time.perf_counter() - step_began
        outcome = "done" if isinstance(parts[name], dict) else f"FAILED ({parts[name]})"
        print(f"[gpu check] {name}: {outcome} in {durations[name]:.1f} s", flush=True)
        for line in section_lines(name, parts, on_cpu):  # the output alone carries the figures too
            print(f"[gpu check]   {line}", flush=True)
        _summarise(header, durations, device, began)
        write_report(report, header, parts, on_cpu)
    shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, part in parts.items()
              if not isinstance(part, dict) or not part.get("agreement", {"ok": True})["ok"]]
    print(f"[gpu check] {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}; "
          f"wrote {report} in {header['total_s']:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
