"""The one warning of a bf16 job on a CPU without native bf16 (made-up CPU flags, made-up rates)."""
from __future__ import annotations

from pathlib import Path

from seesaw_ds.cpu_dtype import bf16_warning, lacks_native_bf16
from seesaw_ds.cpu_features import cpu_flags, cpu_model_name

ZEN3 = {"fpu", "sse2", "avx2", "fma"}
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = ZEN3 | {"avx512f", "avx512_bf16"}


def rates(calls: list[str]):
    table = {"bfloat16": 20e9, "float32": 80e9}

    def rate(dtype: str) -> float:
        calls.append(dtype)
        return table[dtype]
    return rate


def test_bf16_without_native_support_warns_once_with_the_measured_rates():
    calls: list[str] = []
    message = bf16_warning("bfloat16", ZEN3, rates(calls))
    assert calls == ["bfloat16", "float32"]
    assert "20 GFLOP/s against 80 GFLOP/s" in message and "0.25x" in message
    assert "avx512_bf16" in message and "model.dtype=float32" in message and "\n" not in message
    assert bf16_warning("torch.bfloat16", ZEN3, rates([])) is not None  # host.dtype's spelling
    widened = bf16_warning("bfloat16", ZEN3, rates([]), widened=True)
    assert "widened to float32" in widened and "model.cpu_prepack=true" in widened and "\n" not in widened


def test_no_warning_with_native_bf16_other_dtypes_or_unknown_cpus_and_nothing_measured():
    calls: list[str] = []
    for dtype, flags in [("bfloat16", SAPPHIRE_RAPIDS), ("bfloat16", ZEN4), ("float32", ZEN3), ("float16", ZEN3),
                         ("bfloat16", None)]:
        assert bf16_warning(dtype, flags, rates(calls)) is None
    assert calls == []
    assert lacks_native_bf16("bfloat16", {"avx512_bf16"}) is False
    assert lacks_native_bf16("bfloat16", {"amx_bf16"}) is False


def test_flags_come_from_cpuinfo_and_a_cpu_without_x86_flags_is_unknown(tmp_path: Path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) is None and cpu_flags(tmp_path / "missing") is None


def test_model_name_is_the_first_processors(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\nprocessor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n\n"
                       "processor\t: 1\nmodel name\t: another\n")
    assert cpu_model_name(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_model_name(tmp_path / "missing") is None
