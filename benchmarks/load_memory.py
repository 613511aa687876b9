"""Peak host RAM while loading a ~1 GB checkpoint, in Meta's and in Hugging Face's format.

    python benchmarks/load_memory.py            # ~1 GB bf16 checkpoint, both formats
    python benchmarks/load_memory.py --gb 0.25  # smaller

Writes a synthetic checkpoint with random bf16 weights into a temporary folder (Meta: params.json
+ 2 model-parallel shards consolidated.00/01.pth; Hugging Face: config.json + 2 safetensors shards
+ index), loads each with llama_lite.checkpoint.load_checkpoint in a fresh subprocess (CPU,
bfloat16, the dtype it is stored in) and reports that process's peak resident set size
(getrusage ru_maxrss) against the size of the files. A loader that held two copies of the weights
would show a ratio near 2 or more; the target is < 1.5.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llama_lite import ModelArgs, Transformer
from llama_lite.hf import hf_config, hf_state_dict

# Meta's model-parallel layout: each matrix is split along one dimension, norms are replicated.
# (Written out here, not imported from the loader, so that a mistake there cannot cancel itself.)
META_SPLIT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def args_for_gb(gb: float) -> ModelArgs:
    """A Llama-2-like shape (dim 2048, 16 heads, 32000 vocab) with enough layers for ~gb GB in bf16."""
    base = dict(dim=2048, n_heads=16, vocab_size=32000, multiple_of=256, max_seq_len=256)
    layers = 1
    while _params(ModelArgs(**base, n_layers=layers + 1)) * 2 <= gb * 1e9:
        layers += 1
    return ModelArgs(**base, n_layers=layers)


def _params(args: ModelArgs) -> int:
    from llama_lite import count_parameters

    return count_parameters(args)


def random_state_dict(args: ModelArgs, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Random weights with the shapes of llama_lite's Transformer (built on the meta device)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=dtype)
        out[name] = 1 + 0.1 * t if name.endswith("norm.weight") else t * 0.02
    return out


def write_meta(sd: dict, args: ModelArgs, folder: Path, n_shards: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, multiple_of=args.multiple_of,
                  ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps, vocab_size=-1)
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    (folder / "params.json").write_text(json.dumps(params))
    for i in range(n_shards):
        shard = {}
        for name, t in sd.items():
            dim = META_SPLIT_DIM.get(name.split(".")[-2])
            shard[name] = t if dim is None else t.chunk(n_shards, dim=dim)[i].clone()
        shard["rope.freqs"] = torch.ones(args.head_dim // 2)  # Meta's files carry it; loaders ignore it
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
        del shard
    return folder


def write_hf(sd: dict, args: ModelArgs, folder: Path, n_shards: int = 2) -> Path:
    """config.json + model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {**hf_config(args), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    hf = {k: v.contiguous() for k, v in hf_state_dict(sd, args).items()}
    names = list(hf)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: hf[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


MEASURE = r"""
import json, resource, sys, time
import torch
from llama_lite.checkpoint import load_checkpoint

def peak_rss():
    # VmHWM: this process's own high-water mark (getrusage's ru_maxrss survives fork+exec on
    # Linux and would report the parent's peak); elsewhere fall back to getrusage.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024

torch.set_num_threads(2)
before = peak_rss()
start = time.perf_counter()
model, _ = load_checkpoint(sys.argv[1], device="cpu", dtype=sys.argv[2])
seconds = time.perf_counter() - start
peak = peak_rss()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(before=before, peak=peak, weights=weights, seconds=seconds)))
"""


def measure(folder: Path, dtype: str = "bfloat16") -> dict:
    """Load the checkpoint in a fresh Python process; its peak RSS (bytes) and the sizes involved."""
    r = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["files"] = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".pth", ".safetensors"))
    out["ratio"] = out["peak"] / out["files"]
    out["ratio_above_baseline"] = (out["peak"] - out["before"]) / out["files"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (bf16)")
    p.add_argument("--limit", type=float, default=1.5, help="fail if peak RSS / checkpoint size exceeds this")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    args = args_for_gb(a.gb)
    print(f"config: dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} vocab={args.vocab_size} "
          f"-> {_params(args) / 1e6:.0f}M parameters")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        sd = random_state_dict(args)
        write_meta(sd, args, Path(tmp) / "meta")
        write_hf(sd, args, Path(tmp) / "hf")
        del sd
        for fmt in ("meta", "hf"):
            m = measure(Path(tmp) / fmt)
            ok &= m["ratio"] < a.limit
            print(f"{fmt:4s}: files {m['files'] / 1e9:.3f} GB, loaded weights {m['weights'] / 1e9:.3f} GB, "
                  f"RSS after imports {m['before'] / 1e9:.3f} GB, peak RSS {m['peak'] / 1e9:.3f} GB "
                  f"-> peak/size {m['ratio']:.2f} (above baseline {m['ratio_above_baseline']:.2f}), "
                  f"load {m['seconds']:.1f} s")
    print(f"peak RSS < {a.limit} x checkpoint size: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
