"""Model FLOPs utilisation: the peak matmul throughput of the device a run is on, and the MFU ratio.

MFU = (training FLOPs per token × tokens per second) / (peak FLOP/s × number of devices). The FLOPs per token
come from `GPT.estimate_flops()`; the peak is the vendor's dense (no 2:4 sparsity) tensor-core figure for the
GPU, looked up by the name CUDA reports. A CPU has no datasheet number that means anything here (it depends on
cores, threads, AVX width and whoever else is using the box), so on CPU the peak is *measured*: the best fp32
matmul rate of a few large square matmuls, measured once per process and cached. CPU MFU is therefore "fraction of
what this process can get out of a plain matmul right now", which is the useful question on a shared machine.

By convention MFU is reported against the bf16 peak even when the hidden matmuls run in fp8 (as nanochat and
most papers do), so fp8 shows up as a higher MFU rather than moving the goalposts; `peak_flops(..., fp8=True)`
gives the fp8 figure for anyone who wants the stricter ratio.
"""

from __future__ import annotations

import functools
import time

import torch

# Dense tensor-core peaks in FLOP/s: (bf16/fp16 with fp32 accumulate, fp8 or None where there are no fp8 units).
# Matched as substrings of torch.cuda.get_device_name(), first match wins, so specific names come before generic.
GPU_PEAK_FLOPS: list[tuple[str, float, float | None]] = [
    ("GH200", 989e12, 1979e12),
    ("H200", 989e12, 1979e12),  # same compute die as the H100 SXM, more and faster memory
    ("H100 PCIe", 756e12, 1513e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H100", 989e12, 1979e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H800", 989e12, 1979e12),
    ("B200", 2250e12, 4500e12),
    ("B100", 1750e12, 3500e12),
    ("A100", 312e12, None),
    ("A800", 312e12, None),
    ("L40S", 362e12, 733e12),
    ("L40", 181e12, 362e12),
    ("L4", 121e12, 242e12),
    ("A10G", 70e12, None),
    ("A10", 125e12, None),
    ("A6000", 155e12, None),
    ("RTX 6000 Ada", 364e12, 728e12),
    ("RTX 5090", 209e12, 419e12),
    ("RTX 4090", 165e12, 330e12),
    ("RTX 3090", 71e12, None),
    ("V100", 125e12, None),  # fp16 (Volta has no bf16)
    ("T4", 65e12, None),  # fp16
    ("MI300X", 1307e12, 2615e12),
    ("MI250X", 383e12, None),
]


def gpu_peak_flops(device_name: str, fp8: bool = False) -> float | None:
    """Datasheet dense peak for a CUDA device name, or None when the GPU (or its fp8 support) is unknown."""
    for key, bf16_peak, fp8_peak in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return fp8_peak if fp8 else bf16_peak
    return None


@functools.lru_cache(maxsize=None)
def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 5, num_threads: int | None = None) -> float:
    """Best observed fp32 FLOP/s of a size×size matmul on the CPU (cached per process and thread count).

    The best of several timings, not the median: a peak is what the hardware can do when nobody interrupts it.
    `num_threads` is only part of the cache key (defaults to torch's current setting); it is never changed here.
    """
    del num_threads  # a cache key only: a different torch.set_num_threads gives a different peak
    if size < 16 or repeats < 1:
        raise ValueError(f"size={size}, repeats={repeats}: expected size >= 16 and repeats >= 1")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device | str, fp8: bool = False) -> float | None:
    """Peak matmul FLOP/s of one device: datasheet bf16 (or fp8) on CUDA, None if the GPU is unknown; the measured
    fp32 rate on CPU (where training runs in fp32); None elsewhere (mps: no reliable figure)."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), fp8=fp8)
    if device.type == "cpu":
        return measure_cpu_matmul_flops(num_threads=torch.get_num_threads())
    return None


def model_flops_utilization(flops_per_token: float, tokens_per_second: float, peak: float | None,
                            num_devices: int = 1) -> float | None:
    """Achieved / peak FLOP/s across `num_devices` (tokens_per_second is the global rate); None without a peak."""
    if peak is None or peak <= 0 or num_devices < 1:
        return None
    return flops_per_token * tokens_per_second / (peak * num_devices)
