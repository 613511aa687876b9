"""A Llama-2-7B-shaped checkpoint with random weights, in Meta's and in Hugging Face's format,
loaded by llama_lite in bf16 on a GPU and checked against transformers.

    python benchmarks/load_7b_gpu.py            # on a GPU machine: ~27 GB of disk, ~14 GB GPU memory per model
    python benchmarks/load_7b_gpu.py --tiny     # the same code path on the CPU with a tiny config (CI)

Reports, for each format: load time, peak GPU memory against parameters x 2 bytes +
kv_cache_bytes (the arithmetic of notebook 03), prefill and decode speed, and the logits'
difference from transformers' LlamaForCausalLM loading the Hugging Face files itself.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_memory import random_state_dict, write_hf, write_meta  # noqa: E402

from llama_lite import Llama, ModelArgs, count_parameters, kv_cache_bytes  # noqa: E402
from llama_lite.checkpoint import load_checkpoint  # noqa: E402
from llama_lite.timing import sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"


def gpu_peak_reset(device):
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak(device) -> int:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else 0


def build(folder: Path, device, dtype, max_seq_len: int, tokenizer):
    """Llama.build when the Llama-2 tokenizer is at hand (it checks its vocabulary against the
    model's); load_checkpoint, the same loader underneath, when it is not."""
    if tokenizer is not None:
        return Llama.build(folder, tokenizer, max_seq_len=max_seq_len, device=device, dtype=dtype).model
    return load_checkpoint(folder, device=device, dtype=dtype, max_seq_len=max_seq_len)[0]


@torch.inference_mode()
def measure(model, tokens, decode_steps: int, device) -> dict:
    """Logits of `tokens` (no cache), then prefill + decode_steps greedy steps with the KV cache."""
    logits = model(tokens).float().cpu()
    bsz, n = tokens.shape
    model.setup_cache(bsz, n + decode_steps)
    sync(device)
    start = time.perf_counter()
    out = model(tokens, 0)
    sync(device)
    prefill = time.perf_counter() - start
    nxt = out[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for i in range(decode_steps):
        nxt = model(nxt, n + i)[:, -1].argmax(-1, keepdim=True)
    sync(device)
    decode = time.perf_counter() - start
    peak = gpu_peak(device)
    model.clear_cache()
    return dict(logits=logits, prefill_tok_s=bsz * n / prefill, decode_tok_s=bsz * decode_steps / decode, peak=peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU in float32 (the CI smoke test)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --tiny)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    a = p.parse_args(argv)
    if a.tiny:
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=128)
        device, dtype, meta_shards = a.device or "cpu", a.dtype or "float32", 2
        prompt_len, decode_steps = a.prompt_len or 32, a.decode_steps or 8
    else:
        args = ModelArgs.from_name("llama2-7b")
        device, dtype, meta_shards = a.device or "cuda", a.dtype or "bfloat16", 1  # Meta's 7B is one shard
        prompt_len, decode_steps = a.prompt_len or 512, a.decode_steps or 128
        if not torch.cuda.is_available() and torch.device(device).type == "cuda":
            print("no GPU here: run with --tiny for the CPU smoke test", file=sys.stderr)
            return 2
    torch.set_num_threads(min(torch.get_num_threads(), 2) if a.tiny else torch.get_num_threads())
    tdtype = getattr(torch, dtype)
    tokenizer = TOKENIZER if TOKENIZER.is_file() else None
    n_params = count_parameters(args)
    kv = kv_cache_bytes(args, 1, prompt_len + decode_steps, tdtype)
    budget = n_params * tdtype.itemsize + kv
    print(f"config: dim={args.dim} layers={args.n_layers} heads={args.n_heads}/{args.n_kv_heads} "
          f"-> {n_params / 1e9:.3f} B parameters; device {device}, {dtype}; "
          f"{'Llama.build with the Llama-2 tokenizer' if tokenizer else 'load_checkpoint (no tokenizer.model found)'}")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, prompt_len), generator=g).to(device)
    ok = True
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        start = time.perf_counter()
        sd = random_state_dict(args, dtype=tdtype)
        write_meta(sd, args, Path(tmp) / "meta", n_shards=meta_shards)
        write_hf(sd, args, Path(tmp) / "hf")
        del sd
        gc.collect()
        print(f"wrote both formats in {time.perf_counter() - start:.1f} s")

        results = {}
        for fmt in ("meta", "hf"):
            gpu_peak_reset(device)
            start = time.perf_counter()
            model = build(Path(tmp) / fmt, device, dtype, prompt_len + decode_steps, tokenizer)
            sync(device)
            load_s = time.perf_counter() - start
            r = measure(model, tokens, decode_steps, device)
            r["load_s"] = load_s
            results[fmt] = r
            del model
            gpu = (f"peak GPU {r['peak'] / 2**30:.2f} GiB vs params x {tdtype.itemsize} + kv_cache_bytes "
                   f"{budget / 2**30:.2f} GiB (x{r['peak'] / budget:.3f}), " if r["peak"] else "")
            print(f"{fmt:4s}: load {load_s:.1f} s, {gpu}prefill {r['prefill_tok_s']:.0f} tok/s, "
                  f"decode {r['decode_tok_s']:.1f} tok/s")

        import transformers

        gpu_peak_reset(device)
        ref_model = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=tdtype).to(device).eval()
        with torch.inference_mode():
            ref = ref_model(tokens).logits.float().cpu()
        del ref_model
    scale = ref.abs().max().item()
    tol = 1e-4 if tdtype == torch.float32 else 0.05 * scale  # bf16 rounds each layer's output to 8 bits
    for fmt, r in results.items():
        diff = (r["logits"] - ref).abs().max().item()
        agree = (r["logits"].argmax(-1) == ref.argmax(-1)).float().mean().item()
        good = diff <= tol and agree >= (1.0 if tdtype == torch.float32 else 0.9)
        ok &= good
        print(f"{fmt:4s} vs transformers: max |diff| {diff:.3g} (logits up to {scale:.3g}, tolerance {tol:.3g}), "
              f"top-1 agreement {agree:.1%}: {'PASS' if good else 'FAIL'}")
    same = torch.equal(results["meta"]["logits"], results["hf"]["logits"])
    print(f"meta and hf logits identical: {same}")
    ok &= same
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
