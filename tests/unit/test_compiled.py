"""The compiled forward (seesaw_ds/model/compiled.py): when ``model.compile`` compiles, that a compiled stage
gives eager's logits (float32, within 1e-4) and tokens across prefill and decode steps of several families,
and how many separate kernels one decoder layer runs in a decode step, eager and compiled."""
from __future__ import annotations

import collections
import pytest
import torch

import tiny_families as tf
from seesaw_ds.model import kernels
from seesaw_ds.model.compiled import resolve
from one_rank import PROMPTS, executor as _executor, generate as _generate

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode,device,dtype,flags,want", [
    ("true", CPU, torch.float32, set(), True),
    ("false", CPU, torch.bfloat16, {"amx_bf16"}, False),
    (True, CPU, torch.float32, set(), True),
    ("auto", CPU, torch.float32, {"amx_bf16"}, False),
    ("auto", CPU, torch.bfloat16, {"amx_bf16", "avx512f"}, True),
    ("auto", CPU, torch.bfloat16, {"avx512_bf16", "avx512f"}, False),
    ("auto", torch.device("cuda"), torch.bfloat16, set(), True),
    ("AUTO", torch.device("cuda"), torch.float16, set(), True),
])
def test_when_auto_compiles(mode, device, dtype, flags, want):
    assert resolve(mode, device, dtype, cpu_flags=flags) is want


def test_a_bad_mode_names_the_value():
    with pytest.raises(ValueError, match="model.compile='sometimes'"):
        resolve("sometimes", CPU, torch.bfloat16, cpu_flags=set())


@pytest.mark.parametrize("case", ["llama3", "gemma2"])
def test_compiled_float32_gives_eager_logits_and_tokens(family_models, one_torch_thread, case):
    """Llama; Gemma 2 (soft-caps, sliding-window and global layers alternating: two graphs). The other
    families were checked the same way once (docs/benchmarks.md): compiling every test family would cost
    minutes of CI; tests/multirank/test_job.py runs a compiled job under a layout switch."""
    eager = _generate(_executor(family_models[case], "float32", False))
    compiled_executor = _executor(family_models[case], "float32", True)
    compiled = _generate(compiled_executor)
    assert compiled_executor.compile_seconds > 0
    for want, got in zip(eager, compiled):
        assert (want - got).abs().max().item() <= 1e-4
        assert torch.equal(want.argmax(-1), got.argmax(-1))


#: Profiler events that launch no kernel: views, reshapes, allocations.
NO_KERNEL = {"aten::view", "aten::reshape", "aten::transpose", "aten::as_strided", "aten::unsqueeze", "aten::slice",
             "aten::select", "aten::expand", "aten::t", "aten::_reshape_alias", "aten::detach", "aten::alias",
             "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view_as", "aten::narrow",
             "aten::squeeze", "aten::permute", "aten::split", "aten::chunk", "aten::unbind", "aten::lift_fresh",
             "aten::resolve_conj", "aten::resolve_neg"}
REGION = "decoder layers"


def _is_kernel(event) -> bool:
    name = event.name
    if name in NO_KERNEL:
        return False
    if name == "aten::to":  # a cast to the tensor's own dtype is no kernel
        return any(child.name in ("aten::_to_copy", "aten::copy_") for child in event.cpu_children)
    return name.startswith(("aten::", "mkldnn::", "seesaw::")) or "cpp_fused" in name


def _outermost(event) -> bool:
    parent = event.cpu_parent
    while parent is not None and parent.name != REGION:
        if _is_kernel(parent):
            return False
        parent = parent.cpu_parent
    return True


def kernels_per_layer(executor) -> tuple[float, collections.Counter]:
    """Separate kernels one decoder layer runs in a decode step of three sequences: the outermost kernel
    events inside the layers' calls (a fused inductor kernel, an operator such as attention or a linear,
    each counted once), averaged over the layers."""
    from seesaw_ds.model import attention
    from seesaw_ds.model.executor import ForwardPlan, SeqWork
    from seesaw_ds.model.stage import _run_layer

    stage = executor.stages["decode"]
    cache = executor.cache()
    executor.forward(ForwardPlan("prefill", [SeqWork(i, 0, p) for i, p in enumerate(PROMPTS)], sink="device"))
    lengths = [len(p) for p in PROMPTS]
    run = stage.compiled or _run_layer

    def decode_layers(profiler=None):
        work = [SeqWork(i, 0, [3], start=n) for i, n in enumerate(lengths)]
        meta, token_ids, positions = executor._decode_inputs(work, cache, None)
        with torch.inference_mode():
            hidden = stage.embed_tokens(token_ids)
            embeddings = stage.rope(hidden, positions, list(range(len(work) + 1)))
            with attention.batch(meta) as current:
                if profiler is not None:
                    profiler.start()
                with torch.profiler.record_function(REGION):
                    for index, layer in zip(stage.layer_ids, stage.layers):
                        current.layer = index
                        hidden = run(layer, hidden, positions, embeddings)
                if profiler is not None:
                    profiler.stop()
        lengths[:] = [n + 1 for n in lengths]

    for _ in range(3):
        decode_layers()  # compile (both graphs: prefill done, decode batches) and warm up
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    decode_layers(profiler)
    names = collections.Counter(e.name for e in profiler.events() if _is_kernel(e) and _outermost(e))
    assert names["seesaw::attention"] in (0, len(stage.layers))  # eager calls the function, not the operator
    return sum(names.values()) / len(stage.layers), names


def test_a_compiled_decoder_layer_runs_at_most_15_kernels(family_models, one_torch_thread, monkeypatch):
    """bf16 (prepacked linears, as users run it): eager 15 kernels per layer (41 before the RMSNorms, the rotary
    apply and the MLP's silu * up became one kernel call each: linears, casts, residuals, splits remain),
    compiled at most 15: seven linears, attention, and the fused loops between."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "enable_kernel_profile", True)  # fused kernels show in the profile
    eager, eager_names = kernels_per_layer(_executor(family_models["llama3"], "bfloat16", False))
    compiled, compiled_names = kernels_per_layer(_executor(family_models["llama3"], "bfloat16", True))
    # silu_mul only where its build has the AVX-512 lanes (kernels.silu_mul_applies; an AVX2 CPU keeps ATen's two)
    silu_mul_here = kernels.silu_mul_applies(torch.ones(1, dtype=torch.bfloat16))
    assert eager >= 13 and eager_names["seesaw::rms_norm"] > 0 and eager_names["seesaw::rotary"] > 0 \
        and (eager_names["seesaw::silu_mul"] > 0) == silu_mul_here, eager_names
    assert compiled_names["seesaw::attention"] > 0 and "seesaw::attention" not in eager_names
    assert any("cpp_fused" in name for name in compiled_names), compiled_names  # it really ran compiled
    assert compiled <= 15, compiled_names
