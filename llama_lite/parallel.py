"""Notebook 08: one model over several devices (tensor parallelism) with torch.distributed.

Megatron-style tensor parallelism, written with PyTorch's own API
(`torch.distributed.tensor.parallel`): no fairscale, no collective of our own.

- W_q, W_k, W_v, W_1, W_3 are column-parallel: rank r holds a block of their output rows, so it
  computes whole attention heads (and a slice of the FFN's hidden units) with no communication.
- W_o and W_2 are row-parallel: rank r holds the matching block of their input columns, and the
  partial products are summed across ranks with one all-reduce each (two per layer).
- The KV cache follows the heads: each rank caches only its own key/value heads. When there are
  more ranks than key/value heads (Llama-2-70B has 8), each kv head is replicated onto the ranks
  whose query heads read it, as inference servers do.
- The embedding is split like Meta's shards (along the model dimension, gathered after the lookup);
  with tied embeddings (SmolLM2) it is split along the vocabulary instead so that the output
  projection can share the same shard. The output projection is column-parallel with gathered
  logits, so every rank sees the full logits and picks the same next token.

Loading: each rank reads only the slices it owns, through its format's slice reader
(checkpoint.meta_slice_reader, hf.hf_slice_reader, gguf.gguf_slice_reader: each says how).

Run: torchrun --nproc-per-node N -m llama_lite generate "..." (gloo on CPUs, NCCL on GPUs).
"""
from __future__ import annotations

import argparse
import atexit
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import detect_format, empty_model, meta_slice_reader, read_model_args
from .config import ModelArgs
from .devices import resolve_dtype
from .generation import Llama
from .gguf import gguf_slice_reader, smollm2_gguf_path
from .hf import hf_slice_reader
from .kv_cache import KVCache
from .model import Transformer
from .tokenizer import Tokenizer, tokenizer_file

# Which dimension of each weight is split across ranks (None: every rank holds all of it).
# Column-parallel weights (out_features, in_features) split dim 0, row-parallel ones dim 1.
COLWISE = ("wq", "wk", "wv", "w1", "w3")
ROWWISE = ("wo", "w2")


# -- sizes: what each rank holds ----------------------------------------------------------------
def check_world_size(args: ModelArgs, world_size: int) -> None:
    """Refuse, with the reason, a world size that cannot split this model by whole heads."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if args.n_heads % world_size:
        ok = [n for n in range(1, args.n_heads + 1) if args.n_heads % n == 0]
        raise ValueError(
            f"tensor parallelism splits attention by whole heads: {args.n_heads} query heads cannot be shared "
            f"equally by {world_size} processes; use a number of processes that divides {args.n_heads} "
            f"({', '.join(map(str, ok))})")
    kv = args.n_kv_heads
    if world_size > kv and world_size % kv:
        raise ValueError(
            f"{kv} key/value heads cannot be split over {world_size} processes, nor replicated evenly onto them: "
            f"use a divisor or a multiple of {kv} that divides {args.n_heads}")
    if world_size <= kv and kv % world_size:
        raise ValueError(f"{kv} key/value heads cannot be shared equally by {world_size} processes")
    # DTensor's row-parallel input is the even Shard of the column-parallel output before it
    for what, size in (("feed-forward hidden size", args.ffn_hidden_dim), ("vocabulary", args.vocab_size)):
        if size % world_size:
            raise ValueError(f"the {what} ({size}) does not split equally over {world_size} processes")


def local_heads(args: ModelArgs, world_size: int) -> tuple[int, int]:
    """(query heads, key/value heads) on each rank; kv heads are replicated when world_size > n_kv_heads."""
    check_world_size(args, world_size)
    return args.n_heads // world_size, max(1, args.n_kv_heads // world_size)


def shard_dim(name: str, args: ModelArgs) -> int | None:
    """The dimension along which parameter `name` is split (None: replicated)."""
    if name == "tok_embeddings.weight":
        return 0 if args.tie_embeddings else 1  # tied: the vocabulary, shared with the output's rows
    if name == "output.weight":
        return 0
    module = name.split(".")[-2] if name.count(".") >= 2 else ""
    if module in COLWISE:
        return 0
    if module in ROWWISE:
        return 1
    return None  # norms


def _chunk(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's piece in torch.chunk(size, world_size): DTensor's Shard layout."""
    step = -(-size // world_size)
    start = min(rank * step, size)
    return start, min(start + step, size)


def local_slice(name: str, shape, args: ModelArgs, world_size: int, rank: int) -> tuple[int | None, int, int, tuple]:
    """(dim, start, stop, global shape) of the original tensor `name` of `shape` that rank holds.
    For W_k/W_v with more ranks than kv heads, the rows of the one kv head this rank's query heads
    read, and the global (logical) shape is that of the replicated matrix (world_size kv heads)."""
    dim = shard_dim(name, args)
    if dim is None:
        return None, 0, 0, tuple(shape)
    if name.endswith(("attention.wk.weight", "attention.wv.weight")) and world_size > args.n_kv_heads:
        hd = args.head_dim
        k = rank // (world_size // args.n_kv_heads)  # query heads of rank r read kv head r*kv/N
        return 0, k * hd, (k + 1) * hd, (world_size * hd, shape[1])
    start, stop = _chunk(shape[dim], world_size, rank)
    return dim, start, stop, tuple(shape)


# -- the process group ------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str | None = None):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); NCCL on GPUs,
    gloo on CPUs. Returns a 1-D DeviceMesh over all ranks and this rank's device."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    return mesh, device


# -- sharding a model ------------------------------------------------------------------------
def tp_plan(args: ModelArgs) -> dict:
    """The parallelize_module plan: module name -> ParallelStyle."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {
        # tied (vocab-split) embedding: each rank looks up the tokens in its rows, zeros elsewhere,
        # one all-reduce sums them; untied (dim-split, Meta's layout): an all-gather joins the columns
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()) if args.tie_embeddings
        else ColwiseParallel(output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),  # all-gather: every rank has all logits
    }
    for i in range(args.n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()  # output: all-reduce of the partial sums
    return plan


def _sharded_setup_cache(self, max_batch_size=1, max_seq_len=None, dtype=None, device=None) -> None:
    """Transformer.setup_cache for a sharded model: each rank caches only its own kv heads."""
    p = self.params
    weight = self.layers[0].attention_norm.weight  # a plain tensor on this rank's device
    for layer in self.layers:
        a = layer.attention
        a.cache = KVCache(max_batch_size, max_seq_len or p.max_seq_len, a.n_kv_heads,
                          p.head_dim, dtype or weight.dtype, device or weight.device)


def _localize(model: Transformer, mesh) -> Transformer:
    """Install the plan's hooks and make each attention module count only its local heads."""
    from torch.distributed.tensor.parallel import parallelize_module

    args = model.params
    world_size = mesh.size()
    n_heads, n_kv_heads = local_heads(args, world_size)
    parallelize_module(model, mesh, tp_plan(args))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # one shard serves both
    for layer in model.layers:
        a = layer.attention
        a.n_heads, a.n_kv_heads, a.n_rep = n_heads, n_kv_heads, n_heads // n_kv_heads
    # The model's own setup_cache sizes the cache with the global kv heads; this instance's uses the local ones.
    model.setup_cache = types.MethodType(_sharded_setup_cache, model)
    model.tensor_parallel = dict(world_size=world_size, rank=mesh.get_local_rank(), n_heads=n_heads,
                                 n_kv_heads=n_kv_heads)
    return model


def _fill(model: Transformer, read: Callable, mesh, device, dtype) -> Transformer:
    """Give each parameter of a (meta) model its local slice as a DTensor (or a plain tensor when
    replicated). read(name, shape, dim, start, stop) returns the original tensor's slice."""
    from torch.distributed.tensor import DTensor, Shard

    args, world_size, rank = model.params, mesh.size(), mesh.get_local_rank()
    check_world_size(args, world_size)
    for name, param in list(model.named_parameters()):
        if name == "output.weight" and args.tie_embeddings:
            continue
        dim, start, stop, global_shape = local_slice(name, param.shape, args, world_size, rank)
        t = read(name, tuple(param.shape), dim, start, stop)
        expected = list(param.shape) if dim is None else [*param.shape[:dim], stop - start, *param.shape[dim + 1:]]
        if list(t.shape) != expected:
            raise ValueError(f"{name}: read a slice of shape {tuple(t.shape)}, expected {tuple(expected)}")
        value = t.to(device=device, dtype=dtype).contiguous()
        if value.data_ptr() == t.data_ptr():
            value = value.clone()  # own the memory, not a map of a file
        if dim is not None:
            stride = torch.empty(global_shape, device="meta").stride()
            value = DTensor.from_local(value, mesh, [Shard(dim)], run_check=False, shape=torch.Size(global_shape),
                                       stride=stride)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    return _localize(model, mesh).eval()


def shard_model(model: Transformer, mesh, device=None, dtype=None) -> Transformer:
    """A tensor-parallel copy of a full model that every rank holds (tests, small demos)."""
    state = dict(model.named_parameters())
    weight = model.tok_embeddings.weight
    device = device or weight.device
    dtype = dtype or weight.dtype

    def read(name, shape, dim, start, stop):
        t = state[name]
        return t if dim is None else t.narrow(dim, start, stop - start)

    return _fill(empty_model(model.params), read, mesh, device, dtype)


def load_sharded(path=None, mesh=None, device=None, dtype=None, max_seq_len: int | None = None) -> Transformer:
    """Load a checkpoint (Meta folder, HF folder, .gguf; None: the embedded SmolLM2) straight into
    this rank's shard of a tensor-parallel model. No rank ever holds the whole model."""
    if mesh is None:
        mesh, own_device = init_distributed(torch.device(device).type if device is not None else None)
        device = device if device is not None else own_device
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    path = smollm2_gguf_path() if path is None else Path(path)
    args = read_model_args(path, max_seq_len=max_seq_len)  # None: the checkpoint's own
    check_world_size(args, mesh.size())
    kind = detect_format(path)
    read = (meta_slice_reader(path, mesh.get_local_rank(), mesh.size()) if kind == "meta"
            else hf_slice_reader(path, args) if kind == "hf" else gguf_slice_reader(path))
    model = _fill(empty_model(args), read, mesh, device, dtype)
    model.tensor_parallel["files_read"] = sorted(getattr(read, "files_read", [path.name]))
    return model


# -- accounting: bytes per rank -----------------------------------------------------------------
def params_per_rank(args: ModelArgs, world_size: int) -> int:
    """Parameters one rank holds: split matrices / N (kv heads replicated when N > n_kv_heads), norms whole."""
    _, kv_local = local_heads(args, world_size)
    hd, dim, h = args.head_dim, args.dim, args.ffn_hidden_dim
    attention = 2 * dim * dim // world_size + 2 * dim * kv_local * hd
    ffn = 3 * dim * (-(-h // world_size))
    emb = args.vocab_size * dim * (1 if args.tie_embeddings else 2) // world_size
    return emb + args.n_layers * (attention + ffn + 2 * dim) + dim


def kv_cache_bytes_per_rank(args: ModelArgs, world_size: int, batch_size: int, seq_len: int,
                            dtype: torch.dtype = torch.bfloat16) -> int:
    _, kv_local = local_heads(args, world_size)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * kv_local * args.head_dim * seq_len * batch_size * element


def allreduce_bytes_per_token(args: ModelArgs, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of activations entering the all-reduces for one generated token: two per layer
    (after W_o and after W_2), each a (batch, dim) vector."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * batch_size * args.dim * element


def ring_bytes_sent_per_rank(payload: int, world_size: int) -> float:
    """A ring all-reduce (NCCL's for large messages) sends 2 (N-1)/N of the payload from each rank."""
    return 2 * (world_size - 1) / world_size * payload


# -- processes ----------------------------------------------------------------------------------
def launch(nproc: int, args, timeout: float = 600, threads: int = 1, env=None) -> subprocess.CompletedProcess:
    """Run `python -m args[0] args[1:]` (or the script args[0] if it ends in .py) in nproc processes
    with torchrun on the loopback interface (gloo on CPUs), one torch thread each; returns the
    finished process (stdout, stderr, returncode)."""
    args = [str(a) for a in args]
    target = args if args[0].endswith(".py") else ["-m", *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *target]
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLAMA_LITE_TORCH_THREADS": str(threads),
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _set_threads() -> None:
    threads = os.environ.get("LLAMA_LITE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def build_llama(ckpt_dir=None, tokenizer_path=None, max_seq_len=None, device=None, dtype=None, seed=None,
                progress=False, quantize=None):
    """Llama.build for one rank of a tensor-parallel run (the CLI calls it under torchrun)."""
    _set_threads()
    if seed is not None:
        torch.manual_seed(seed)
    if quantize is not None:
        raise ValueError("--quantize is not supported with several processes: the sharded model keeps float weights")
    tok_file = tokenizer_file(ckpt_dir, tokenizer_path)  # before the weights: a missing one fails at once
    start = time.perf_counter()
    mesh, dev = init_distributed(torch.device(device).type if device else None)
    atexit.register(_close)
    model = load_sharded(ckpt_dir, mesh, dev, dtype, max_seq_len=max_seq_len)
    tokenizer = Tokenizer.load(tok_file)
    llama = Llama(model, tokenizer)
    llama.load_seconds = time.perf_counter() - start
    return llama


def _close() -> None:
    """Leave the process group together: a rank that closed its connections while another still
    reads the last all-reduce's bytes would fail that rank (gloo: 'Connection closed by peer')."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int):
    """End a rank's process: leave the group together (_close), flush, and exit without the
    interpreter's finalization. The work is done and saved by then; finalization only tears down
    torch.distributed's C++ threads, and that sometimes aborted a rank that had finished
    ("terminate called without an active exception", no Python frame on the stack; about one
    run in 30 of notebook 08's three-process run on the development machine), failing a run
    whose results were all written."""
    _close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _logits_main(argv) -> int:
    """python -m llama_lite.parallel logits: each rank loads its shard; rank 0 saves the gathered
    logits of a prompt and of a few cached decode steps, and what each rank held."""
    p = argparse.ArgumentParser(prog="python -m llama_lite.parallel logits")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    _set_threads()
    mesh, device = init_distributed("cpu")
    model = load_sharded(a.checkpoint, mesh, device, torch.float32, max_seq_len=a.max_seq_len)
    tokens = torch.tensor([[int(t) for t in a.tokens.split(",")]])
    with torch.inference_mode():
        prefill = model(tokens)
        model.setup_cache(1, a.max_seq_len)
        steps, nxt, pos = [model(tokens)], prefill[:, -1].argmax(-1, keepdim=True), tokens.shape[1]
        fed = []
        for _ in range(a.decode_steps):
            fed.append(int(nxt))
            out = model(nxt, pos)
            steps.append(out)
            nxt, pos = out[:, -1].argmax(-1, keepdim=True), pos + 1
    from torch.distributed.tensor import DTensor

    local = sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in model.parameters())
    cache = model.caches[0].cache_k.shape
    info = dict(rank=dist.get_rank(), local_params=local, cache_shape=tuple(cache), backend=dist.get_backend(),
                dtensor=any(isinstance(t, DTensor) for t in model.parameters()))
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    if dist.get_rank() == 0:
        torch.save(dict(prefill=prefill, first_cached=steps[0], decode=torch.cat(steps[1:], dim=1), decode_tokens=fed,
                        ranks=infos), a.out)
    return 0  # exit_rank (its caller) leaves the group


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "logits":
        exit_rank(_logits_main(sys.argv[2:]))
    print("usage: torchrun --nproc-per-node N -m llama_lite.parallel logits --tokens 1,2,3 --out logits.pt",
          file=sys.stderr)
    sys.exit(2)
