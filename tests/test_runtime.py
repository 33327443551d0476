"""Process-wide settings: fp32 matmul precision and the CPU allocator (deflect.engine.runtime)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from deflect.engine.runtime import apply_runtime, set_matmul_precision

# A training step's pattern: allocate and touch a few large activations, free them all; repeat.
# Freshly mapped memory faults once per 4 KiB page; memory the allocator kept faults not at all.
# The figure is the page faults of the last three steps, after the heap has settled.
FAULTS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from deflect.engine.runtime import tune_cpu_allocator
    print(tune_cpu_allocator(sys.argv[1]))
    sizes_mib = [51, 19, 51, 6, 77, 19, 51]
    for step in range(8):
        if step == 5:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.empty(s * 2**18).fill_(1.0) for s in sizes_mib]
        del xs
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)
PAGES = 3 * (51 + 19 + 51 + 6 + 77 + 19 + 51) * 2**20 // 4096


def steady_state_faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    applied, faults = steady_state_faults("tuned")
    assert applied
    assert faults < PAGES // 20, f"{faults} page faults touching {PAGES} pages again"
    applied, faults = steady_state_faults("default")  # glibc's own: unmapped and mapped again
    assert not applied
    assert faults > PAGES // 2


def test_bad_settings_name_the_key_and_choices():
    with pytest.raises(ValueError, match=r"matmul_precision='fp32'.*highest"):
        set_matmul_precision("fp32")
    with pytest.raises(ValueError, match=r"cpu_allocator='jemalloc'.*tuned"):
        apply_runtime(
            OmegaConf.create({"matmul_precision": "highest", "cpu_allocator": "jemalloc"})
        )


def test_apply_runtime_pins_the_precision_a_library_changed():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")  # what importing TerraTorch 1.2 does
        apply_runtime(OmegaConf.create({"matmul_precision": "highest", "cpu_allocator": "default"}))
        assert torch.get_float32_matmul_precision() == "highest"
        # cuDNN convolutions are true fp32 too (PyTorch's switch alone leaves them in TF32).
        assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
        apply_runtime(OmegaConf.create({"matmul_precision": "high", "cpu_allocator": "default"}))
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        apply_runtime(OmegaConf.create({}))  # old run folders have neither key: true fp32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
