"""How the process computes fast on a CPU: mixed precision where the hardware is native, and an
allocator that keeps freed memory (measured in bench/README.md)."""

from __future__ import annotations

import ctypes
import sys

import torch

PRECISIONS = ("auto", "fp32")


# -- mixed precision: bf16 (or fp16) on CUDA, and bf16 on CPUs with AMX or AVX512-BF16, where oneDNN
# runs the encoder about 1.5-2x faster than fp32. Elsewhere bf16 would be emulated and slower, so it stays off.


def native_cpu_bf16() -> bool:
    # private probes (torch.cpu has no public one); a torch without them just means no bf16
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                         "_is_avx512_bf16_supported"))


def autocast_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype autocast should use on `device`, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and native_cpu_bf16():
        return torch.bfloat16
    return None


def autocast(device: str | torch.device, precision: str = "auto") -> torch.autocast:
    dtype = autocast_dtype(device, precision)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def keep_freed_memory() -> bool:
    """Stops glibc from handing every large freed block back to the kernel. By default each big
    activation is mmapped and unmapped per forward pass, and refaulting those pages took half of the
    encoder's time here (CPU only; a GPU keeps its own cache). The process then keeps its peak
    memory instead of returning it, so only our batch entry points (the CLI, the bench) call this,
    never the library on import, nor the web app, whose single images gain nothing from it.
    Returns False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
