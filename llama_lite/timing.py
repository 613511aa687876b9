"""Measuring, not guessing: prefill/decode latency and the machine's memory bandwidth.

Decoding one token reads every weight once, so the memory bandwidth divided by the bytes of
weights (plus the KV cache read) bounds tokens/s from above: the roofline of notebooks 03 and 07.
"""
from __future__ import annotations

import time

import torch


def sync(device) -> None:
    """Wait for the device: GPU work is asynchronous, and a timer must not stop before it ends."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(nbytes: int = 1 << 28, device="cpu", repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read nbytes + write nbytes), best of repeats: what
    streaming the weights through the processor can reach at most."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 1 << 28, device="cpu", repeats: int = 5) -> float:
    """Bytes/s of summing a large tensor, best of repeats. Decoding reads weights and writes
    almost nothing, so this is the tighter bound; a copy also pays for its writes (and, on
    most CPUs, for reading each destination line before writing it)."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        src.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


@torch.inference_mode()
def time_prefill_decode(model, prompt_len: int, n_decode: int = 16, seed: int = 0) -> tuple[float, float]:
    """Seconds to first token (prefill of prompt_len random tokens + picking one) and mean
    seconds per later token (inter-token latency, greedy with the KV cache), batch 1."""
    device = model.tok_embeddings.weight.device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.params.vocab_size, (1, prompt_len), generator=g).to(device)
    model.setup_cache(1, prompt_len + n_decode + 1)
    try:
        sync(device)
        t0 = time.perf_counter()
        token = model(prompt, 0)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        sync(device)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        for pos in range(prompt_len, prompt_len + n_decode):
            token = model(token, pos)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        itl = (time.perf_counter() - t0) / n_decode
    finally:
        model.clear_cache()
    return ttft, itl


def cpu_info() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this CPU, from /proc/cpuinfo on Linux; elsewhere
    the platform's name and no flags."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (x86 AVX512_BF16 or AMX, Arm BF16), where
    bf16 weights can pay; elsewhere oneDNN emulates bf16, slower than float32."""
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_description() -> str:
    """The CPU in one line: model name, cores torch uses, the vector ISA torch's kernels picked
    (torch.backends.cpu.get_cpu_capability) and the matrix/bf16/int8 extensions the CPU reports,
    so figures from two machines can be compared."""
    name, flags = cpu_info()
    extensions = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")
                  if f in flags]
    return (f"{name}; {torch.get_num_threads()} threads; torch {torch.__version__} kernels: "
            f"{torch.backends.cpu.get_cpu_capability()}" + (f"; CPU flags: {' '.join(extensions)}" if extensions else ""))
