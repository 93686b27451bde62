"""Where a decode step's time goes on the device: the executor's decode on the Llama-3-8B-shaped model of
``check.py`` under torch.profiler, beside transformers' own forward on the same weights as a peer.

    python tests/gpu/profile_decode.py [OUT_DIR]      # run.sh's environment (PYTHONPATH with tests/gpu/.deps)

Prints, for batch sizes 1 and 32: the executor's step time, transformers' step time (its DynamicCache, same
context), the parameters and buffers not on the device, and the top operators by device and host time
(the tables also go to OUT_DIR). ``SEESAW_GPU_CHECK_ON_CPU=1`` rehearses it at tiny sizes.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import check  # noqa: E402


def _hf_step_s(model_dir: Path, batch: int, context: int, steps: int, device) -> float:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(3, 500, (batch, context), device=device)
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(2):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        check._synchronize(device)
        began = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        token.tolist()
        seconds = (time.perf_counter() - began) / steps
    del model, cache, out
    return seconds


def main(argv: list[str]) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import single_rank_mpi

    on_cpu = os.environ.get("SEESAW_GPU_CHECK_ON_CPU") == "1"
    if not torch.cuda.is_available() and not on_cpu:
        print(check.NO_CUDA_LINE)
        return 0
    single_rank_mpi.install(force=os.environ.get("SEESAW_GPU_CHECK_FAKE_MPI") == "1")
    out_dir = Path(argv[0]) if argv else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if on_cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = check.CPU_SIZES if on_cpu else check.GPU_SIZES
    (check.REPO / "runs").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-profile-", dir=check.REPO / "runs"))
    model_dir = check._build_random_model(work / "model", sizes, device)
    batch, context, steps = max(sizes["batches"]), sizes["context"], 5
    max_new = 40
    rt = check._start(model_dir, staging_tokens=batch * (context + max_new),
                      device_tokens=batch * (context + max_new + 16))
    executor = rt.executor
    executor.activate("prefill")
    stage = executor.stages["prefill"]
    off = [name for name, t in [*stage.named_parameters(), *stage.named_buffers()] if t.device.type != device.type]
    print(f"[profile] parameters/buffers not on {device.type}: {len(off)} {off[:8]}", flush=True)
    seqs = check.Sequences(rt, check._prompts([context] * batch, seed=3, high=sizes["vocab"]), max_new)
    everyone = list(range(batch))
    seqs.prefill_to_staging(everyone)
    seqs.finish(seqs.swap_in(everyone))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for size in sorted(sizes["batches"]):
        group = everyone[:size]
        for _ in range(2):
            seqs.decode(group)
        check._synchronize(device)
        began = time.perf_counter()
        for _ in range(steps):
            seqs.decode(group)
        check._synchronize(device)
        ours = (time.perf_counter() - began) / steps
        with profile(activities=activities) as prof:
            for _ in range(steps):
                seqs.decode(group)
            check._synchronize(device)
        table_device = prof.key_averages().table(sort_by=sort_device, row_limit=30)
        table_host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out_dir / f"profile-b{size}.txt").write_text(table_device + "\n\n" + table_host)
        print(f"[profile] batch {size}: executor decode step {ours * 1e3:.2f} ms", flush=True)
        print(table_device, flush=True)
        print(table_host[:6000], flush=True)
    rt.close()
    for size in sorted(sizes["batches"]):
        hf = _hf_step_s(model_dir, size, context, steps, device)
        print(f"[profile] batch {size}: transformers decode step {hf * 1e3:.2f} ms (DynamicCache, context {context})",
              flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
