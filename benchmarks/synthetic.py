"""Random-weight checkpoints in the exact formats users download, written without holding two copies.

Meta's: `params.json` as Meta ships it for Llama-2-7B (vocab_size -1) and `consolidated.00.pth`
(one model-parallel shard, bf16, with Meta's `rope.freqs`). Hugging Face's: `config.json`,
`model-0000i-of-0000n.safetensors` shards of about `shard_gb` and `model.safetensors.index.json`,
W_q and W_k rows permuted to transformers' rotate-half layout as its converter does. Both hold the
same weights: each tensor is drawn from a generator seeded by its name, so the two writers never
need the whole model at once (the HF writer holds one shard; Meta's single file holds one copy).

Used by benchmarks/load_7b_cpu.py (7B at true size on a CPU) and benchmarks/gpu_check.py.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch

from llama_lite import ModelArgs, Transformer
from llama_lite.hf import hf_config, hf_state_dict

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama2-tokenizer.model"


def shapes(args: ModelArgs) -> dict:
    """Name -> shape of every weight of llama_lite's Transformer for these args (meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def random_tensor(name: str, shape, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """The same tensor for the same name and seed, whichever writer asks: norms near 1, matrices
    N(0, 0.02) (activations stay finite in bf16 through 32 layers)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    t = 1 + 0.1 * t if name.endswith("norm.weight") else 0.02 * t
    return t.to(dtype)


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta ships it (Llama-2-7B's: dim, multiple_of, n_heads, n_layers, norm_eps, vocab_size=-1)."""
    params = dict(dim=args.dim, multiple_of=args.multiple_of, n_heads=args.n_heads, n_layers=args.n_layers,
                  norm_eps=args.norm_eps, vocab_size=-1)
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    return params


def copy_tokenizer(folder: Path, tokenizer: Path = TOKENIZER) -> None:
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} not found: pass the Llama-2 tokenizer.model with --tokenizer")
    shutil.copy(tokenizer, folder / "tokenizer.model")


def write_meta(args: ModelArgs, folder: Path, tokenizer: Path = TOKENIZER, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(meta_params(args)))
    state = {name: random_tensor(name, shape, seed=seed) for name, shape in shapes(args).items()}
    state["rope.freqs"] = torch.ones(args.head_dim // 2, dtype=torch.bfloat16)  # Meta's files carry it
    torch.save(state, folder / "consolidated.00.pth")
    del state
    copy_tokenizer(folder, tokenizer)
    return folder


def write_hf(args: ModelArgs, folder: Path, tokenizer: Path = TOKENIZER, shard_gb: float = 5.0,
             seed: int = 0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**hf_config(args), "torch_dtype": "bfloat16"}))
    all_shapes = shapes(args)
    groups, current, size = [], [], 0
    for name, shape in all_shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_gb * 1e9:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = hf_state_dict({n: random_tensor(n, all_shapes[n], seed=seed) for n in names}, args)
        part = {k: v.contiguous() for k, v in part.items()}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    copy_tokenizer(folder, tokenizer)
    return folder


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".pth", ".safetensors"))
