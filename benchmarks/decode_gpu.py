"""GPU decode benchmark (issue 12): a Llama-2-7B-shaped model with random bf16 weights.

Prefill a prompt (2,048 tokens by default), then greedy-decode, with
  - llama_lite eager (Transformer.forward with its KV cache),
  - the same model with its blocks compiled (llama_lite.fast.compile_model; the first run,
    untimed, compiles),
  - transformers' LlamaForCausalLM eager on the same weights (its own generate loop),
interleaved in one run. Prints decode tok/s, the ratio to transformers, the fraction of the
bandwidth roofline (weight bytes per token / measured copy bandwidth), prefill MFU and peak
memory.

    python benchmarks/decode_gpu.py                          # on a GPU
    python benchmarks/decode_gpu.py --tiny --device cpu      # a small config, runs anywhere (tests)
"""
import argparse
import inspect
import statistics
import time

import torch

from llama_lite.timing import copy_bandwidth, sync

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}  # dense


def peak_tflops(device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def build(args, device, dtype):
    from llama_lite import ModelArgs
    from llama_lite.model import Transformer

    if args.tiny:
        margs = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                          max_seq_len=args.prefill + args.tokens + 8)
    else:
        margs = ModelArgs.from_name("llama2-7b").replace(max_seq_len=args.prefill + args.tokens + 8)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs)
    for p in model.parameters():  # small random weights keep bf16 activations finite
        torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


@torch.inference_mode()
def greedy(first, step, n):
    """n greedy tokens: first() gives the prompt's last logits (1, vocab), step(token, i) those
    after the i-th new token. The last token is not fed back."""
    logits, out = first(), []
    for i in range(n):
        tok = logits.argmax(-1, keepdim=True)  # (1, 1)
        out.append(tok)
        if i + 1 < n:
            logits = step(tok, i)
    return torch.cat(out, 1)[0].tolist()


def eager_decode(model, prompt, n):
    model.setup_cache(1, prompt.shape[1] + n)
    try:
        return greedy(lambda: model(prompt, 0)[:, -1], lambda tok, i: model(tok, prompt.shape[1] + i)[:, -1], n)
    finally:
        model.clear_cache()


def hf_decode(hf, prompt, n):
    from transformers import DynamicCache

    cache = DynamicCache()
    # transformers 5.x renamed past_key_values to cache (the old name warns, then goes); a GPU
    # machine may have either version
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    step = lambda x: hf(x, use_cache=True, **{key: cache}).logits[:, -1]  # noqa: E731
    return greedy(lambda: step(prompt), lambda tok, i: step(tok), n)


def to_hf(model):
    """transformers' LlamaForCausalLM with the same weights (W_q, W_k rows to rotate-half)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_lite.hf import hf_config, hf_state_dict

    a = model.params
    cfg = LlamaConfig(**hf_config(a), attn_implementation="sdpa")
    w = model.tok_embeddings.weight
    with torch.device(w.device):
        hf = LlamaForCausalLM(cfg).to(w.dtype).eval()
    sd = hf_state_dict(model)
    if a.tie_embeddings:
        sd["lm_head.weight"] = w
    hf.load_state_dict(sd, strict=True, assign=True)  # shares the tensors: no second copy
    return hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer config (CPU tests)")
    ap.add_argument("--prefill", type=int, default=None, help="prompt tokens (2048; --tiny: 32)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (256; --tiny: 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled model")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args(argv)
    args.prefill = args.prefill or (32 if args.tiny else 2048)
    args.tokens = args.tokens or (16 if args.tiny else 256)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from llama_lite.fast import compiled_copy

    model = build(args, device, dtype)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.params.vocab_size, (1, args.prefill), device=device)
    runs = {"llama_lite eager": lambda: eager_decode(model, prompt, args.tokens)}
    if not args.no_compile:
        compiled = compiled_copy(model, **({"mode": args.compile_mode} if args.compile_mode else {}))
        runs["llama_lite compiled"] = lambda: eager_decode(compiled, prompt, args.tokens)
    if not args.no_hf:
        hf = to_hf(model)
        runs["transformers eager"] = lambda: hf_decode(hf, prompt, args.tokens)

    t = time.perf_counter()
    outs = {k: f() for k, f in runs.items()}  # warm-up (and compilation)
    warm_s = time.perf_counter() - t
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            sync(device)
            t = time.perf_counter()
            outs[k] = f()
            sync(device)
            times[k].append(time.perf_counter() - t)

    # Prefill alone (eager), for MFU.
    prefill_s = []
    model.setup_cache(1, args.prefill)
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model(prompt, 0)
        sync(device)
        prefill_s.append(time.perf_counter() - t)
    model.clear_cache()
    prefill_s = statistics.median(prefill_s)

    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(1 << 30, device)  # bytes read + written per second by a 1 GiB copy
    roofline = bw / weight_bytes
    # Decode tok/s excludes the prefill: subtract the eager prefill's time from each run (an
    # approximation for the compiled and transformers runs, whose prefill is their own; at
    # 2,048 prompt tokens it is a small part of a 256-token run).
    tps = {k: args.tokens / max(statistics.median(v) - prefill_s, 1e-9) for k, v in times.items()}
    ref = tps.get("transformers eager")
    flops = 2 * n_params * args.prefill + 4 * model.params.n_layers * model.params.dim * args.prefill ** 2 / 2
    print(f"{'tiny' if args.tiny else 'Llama-2-7B-shaped'} random weights, {dtype}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; prefill {args.prefill}, decode {args.tokens} tokens, median of {args.repeats}")
    print(f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bw / 1e9:.0f} GB/s -> roofline {roofline:.1f} tok/s; "
          f"warm-up incl. compile {warm_s:.1f} s")
    print(f"{'method':28s} {'decode tok/s':>12s} {'x transformers':>15s} {'of roofline':>12s}")
    for k, v in tps.items():
        print(f"{k:28s} {v:12.2f} {v / ref if ref else float('nan'):15.2f} {v / roofline:12.0%}")
    print(f"prefill {args.prefill} tokens: {prefill_s * 1e3:.1f} ms, {flops / prefill_s / 1e12:.1f} TFLOP/s, "
          f"MFU {flops / prefill_s / 1e12 / peak_tflops(device):.0%}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    eager = outs["llama_lite eager"]
    same = [f"{k} == eager: {outs[k] == eager}" for k in ("llama_lite compiled", "transformers eager") if k in outs]
    print("greedy tokens: " + ("; ".join(same) or "eager only"))
    return tps, outs


if __name__ == "__main__":
    main()
