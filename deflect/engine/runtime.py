"""Process-wide numerics and memory settings, applied once at start-up from the config.

* ``matmul_precision`` pins ``torch.set_float32_matmul_precision`` and, with it, cuDNN's fp32
  convolutions. ``highest`` (the default) is true fp32. ``high`` and ``medium`` let fp32 matrix
  products and convolutions run in TF32 (NVIDIA Ampere and later) or bf16 (CPUs with
  avx512_bf16 or AMX): about 2x faster linear layers, different arithmetic. PyTorch's own
  switch leaves cuDNN convolutions (UperNet, patch embeddings) in TF32 even at ``highest``;
  here they follow it. Pinning it also undoes libraries that change it when imported
  (TerraTorch 1.2's Clay v1.5 module sets ``medium`` for the whole process).
* ``cpu_allocator: tuned`` keeps freed memory in glibc's heap instead of handing every large
  block back to the kernel: without it each training step maps its activations afresh and pays
  one page fault per 4 KiB (about 0.7 M faults and 2 s of system time a step for ViT-B + UperNet
  at batch 8 on CPU). The cost: the resident size stays at its peak. ``default`` leaves glibc
  as it is; non-glibc systems are left alone either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

import torch

log = logging.getLogger(__name__)

MATMUL_PRECISIONS = ("highest", "high", "medium")
CPU_ALLOCATORS = ("tuned", "default")

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


def set_matmul_precision(precision: str) -> None:
    """Pin fp32 matmul precision (``highest``, ``high`` or ``medium``), cuDNN convolutions too:
    true fp32 at ``highest``, TF32 allowed otherwise."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision={precision!r} is not one of {list(MATMUL_PRECISIONS)}; "
            "highest is true fp32, high/medium allow TF32/bf16 inside fp32 matrix products"
        )
    torch.set_float32_matmul_precision(precision)
    # The legacy switch on purpose: PyTorch refuses to read it once the per-operator API
    # (cudnn.conv.fp32_precision) has been used, and libraries still read it.
    torch.backends.cudnn.allow_tf32 = precision != "highest"


def tune_cpu_allocator(mode: str = "tuned") -> bool:
    """With ``tuned``, stop glibc from returning large freed blocks to the kernel (no mmap for
    big allocations, no heap trimming, 64 MiB of headroom per heap growth). Returns whether
    glibc accepted the settings; ``default`` and non-glibc systems change nothing."""
    if mode not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator={mode!r} is not one of {list(CPU_ALLOCATORS)}")
    if mode == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def apply_runtime(cfg) -> None:
    """Apply the config's ``matmul_precision`` and ``cpu_allocator`` to this process (and to
    the data-loader workers it forks later)."""
    set_matmul_precision(str(cfg.get("matmul_precision", "highest")))
    mode = str(cfg.get("cpu_allocator", "tuned"))
    if tune_cpu_allocator(mode):
        log.debug("glibc allocator tuned: large blocks stay in the heap")
