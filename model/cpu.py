"""What this CPU can compute fast, read once from its flags: the facts that decide precision and engine.

Why a module of its own: the trainer, the embedder, the engine rule and the engine check all ask the same
questions (native bf16? AMX? which int8 kernels?), and the answers must agree. Machines that report the same
model name differ (an AMD EPYC Milan has AVX2 only; a Genoa has AVX-512 with bf16 and VNNI), so everything here
reads the flags, never the name.

Instruction-set classes (:func:`isa_class`) group CPUs whose inference kernels take the same path: oneDNN (under
OpenVINO and PyTorch) picks its int8 and bf16 kernels by these features, and numbers measured on one class need
not hold on another. Without VNNI, for one, int8 products are summed in pairs into saturating 16-bit lanes
(AVX2's ``vpmaddubsw``), so the int8 graph computes something slightly different there (tests/test_quantize.py).
A check that vouches for a faster path names the class it ran on (:mod:`model.training.engine_check`).
"""

from __future__ import annotations

import platform
import re
from functools import lru_cache

__all__ = [
    "ISA_CLASSES",
    "cpu_flags",
    "cpu_has_amx",
    "cpu_has_bf16",
    "cpu_has_vnni",
    "cpu_description",
    "isa_class",
]

#: Instruction-set classes, fastest kernels first: the first whose flags a CPU has is its class.
ISA_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("amx", ("amx_int8", "amx_bf16")),  # Intel Xeon since Sapphire Rapids: AMX tiles
    ("avx512_bf16", ("avx512_bf16",)),  # AMD EPYC Genoa, Intel Cooper Lake: AVX-512 with bf16 and VNNI
    ("avx512_vnni", ("avx512_vnni",)),  # Intel Cascade Lake, Ice Lake: int8 VNNI, no bf16
    ("avx512", ("avx512f",)),  # Intel Skylake-SP: AVX-512 without VNNI
    ("avx2_vnni", ("avx_vnni",)),  # Intel Alder Lake and later clients: VNNI on 256-bit lanes
    ("avx2", ("avx2",)),  # AMD EPYC Milan and Rome, Intel Haswell: no VNNI, int8 sums saturate at 16 bits
)


@lru_cache(maxsize=1)
def _proc_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return _proc_cpuinfo()


def _flag_set(flags: str | None) -> set[str]:
    text = cpu_flags() if flags is None else flags
    return set(re.split(r"[\s:]+", text))


def cpu_has_amx(flags: str | None = None) -> bool:
    """Whether the CPU has AMX tiles for bf16 (an Intel Xeon since Sapphire Rapids), where bf16 matrix products
    run as fast as int8 ones; ``flags`` defaults to this CPU's."""
    return "amx_bf16" in _flag_set(flags)


def cpu_has_bf16(flags: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX); ``flags`` defaults to this CPU's."""
    found = _flag_set(flags)
    return "avx512_bf16" in found or "amx_bf16" in found


def cpu_has_vnni(flags: str | None = None) -> bool:
    """Whether int8 products accumulate in 32 bits in one instruction (VNNI, or AMX): without it int8 kernels
    sum pairs of products in saturating 16-bit lanes."""
    return isa_class(flags) not in ("avx512", "avx2", "baseline")


def isa_class(flags: str | None = None) -> str:
    """The CPU's instruction-set class (:data:`ISA_CLASSES`), ``baseline`` below AVX2; ``flags`` defaults to
    this CPU's."""
    found = _flag_set(flags)
    for name, needs in ISA_CLASSES:
        if any(flag in found for flag in needs):
            return name
    return "baseline"


def cpu_description(flags: str | None = None) -> str:
    """The CPU's model and the features that decide the fast path, e.g. ``AMD EPYC (native bf16: no, AVX-512: no,
    class avx2)``: machines reporting the same model differ (an EPYC Milan has neither). Benchmarks and checks
    name it."""
    text = cpu_flags() if flags is None else flags
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    bf16, avx512 = ("yes" if has else "no" for has in (cpu_has_bf16(text), "avx512f" in _flag_set(text)))
    return (
        f"{name or platform.processor() or 'unknown'} (native bf16: {bf16}, AVX-512: {avx512}, class {isa_class(text)})"
    )
