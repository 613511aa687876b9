"""Tensor parallelism (llama_lite/parallel.py): a model sharded over 2 and 3 CPU processes (gloo,
launched with torchrun) gives the logits of the unsharded model; Meta's 2-shard checkpoint loads
onto 2 ranks with each rank reading only its own shard file, and onto 3 ranks by slices; a Hugging
Face safetensors folder loads onto 2 and 3 ranks; world sizes that do not divide the heads are
refused with a clear message.

This file is also the worker: torchrun runs it as a script (`python tests/test_parallel.py worker
DIR`) and rank 0 writes what it measured to DIR/result-N.json.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import cached_logits, random_model, write_meta

# Tiny configs (head_dim 8; vocab, heads and FFN hidden sizes divisible by 2 and 3). gqa: 2 query
# heads per kv head; mqa: one kv head, replicated on every rank; tied: the vocabulary-split embedding.
CONFIGS = {
    "mha": dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=96, multiple_of=48, max_seq_len=32),
    "gqa": dict(dim=96, n_layers=2, n_heads=12, n_kv_heads=6, vocab_size=96, multiple_of=48, max_seq_len=32),
    "mqa": dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=1, vocab_size=96, multiple_of=48, max_seq_len=32),
    "tied": dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=96, multiple_of=48, max_seq_len=32,
                 tie_embeddings=True),
}
TOKENS = [[5, 17, 3, 88, 41, 9, 60]]
DECODE = [12, 70, 33]  # fed one at a time through the KV cache after the prompt
TOL = 1e-5  # relative, fp32: the all-reduces sum the same terms in another order


@torch.inference_mode()
def _run(model):
    """Prompt logits without the KV cache, then the prompt prefilled into the cache and DECODE
    tokens fed through it (the logits of every position)."""
    return model(torch.tensor(TOKENS)), cached_logits(model, torch.tensor([TOKENS[0] + DECODE]), len(TOKENS[0]))


def _diff(a, b):
    """Largest |difference| relative to the largest |logit|."""
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def _local_params(model):
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def worker(folder: Path) -> None:
    import torch.distributed as dist

    from llama_lite import ModelArgs
    from llama_lite.checkpoint import load_checkpoint
    from llama_lite.parallel import exit_rank, init_distributed, load_sharded, params_per_rank, shard_model

    torch.set_num_threads(1)
    mesh, device = init_distributed("cpu")
    n, rank = dist.get_world_size(), dist.get_rank()
    result = {"backend": dist.get_backend()}
    for name, cfg in CONFIGS.items():
        args = ModelArgs(**cfg)
        model = random_model(args)
        ref = _run(model)
        sharded = shard_model(model, mesh)
        sharded.setup_cache(1, 32)
        cache_heads = sharded.caches[0].cache_k.shape[2]
        sharded.clear_cache()
        result[name] = dict(diff=_diff(_run(sharded), ref), local_params=_local_params(sharded),
                            expected_local=params_per_rank(args, n), full_params=_local_params(model),
                            cache_heads=cache_heads)
        # a perturbed shard must show: the check can fail
        w = sharded.layers[0].feed_forward.w2.weight.to_local()
        w[0, 0] += 1.0 if rank == n - 1 else 0.0
        result[name]["perturbed_diff"] = _diff(_run(sharded), ref)
    for kind in ("meta", "hf"):
        ref = _run(load_checkpoint(folder / kind, device="cpu", dtype=torch.float32)[0])
        model = load_sharded(folder / kind, mesh, device, torch.float32)
        reads = [None] * n
        dist.all_gather_object(reads, model.tensor_parallel["files_read"])
        result[kind] = dict(diff=_diff(_run(model), ref), files_read=reads, local_params=_local_params(model))
    try:  # a model whose 3 heads do not split over 2 ranks
        shard_model(random_model(ModelArgs(dim=48, n_layers=1, n_heads=3 if n == 2 else 2, vocab_size=96)), mesh)
        result["error"] = None
    except ValueError as e:
        result["error"] = str(e)
    if rank == 0:
        (folder / f"result-{n}.json").write_text(json.dumps(result))
    exit_rank(0)  # leave together, without finalization (see exit_rank)


# -- the test process: write the checkpoints, launch the workers --------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Meta's 2-shard layout (each matrix split along its model-parallel dimension, as Meta's
    llama-2-13b download) and a Hugging Face safetensors folder, from one random model."""
    from safetensors.torch import save_file

    from llama_lite import ModelArgs
    from llama_lite.hf import hf_config, hf_state_dict

    root = tmp_path_factory.mktemp("tp")
    cfg = CONFIGS["mha"]
    args = ModelArgs(**cfg)
    sd = {k: v.detach().clone() for k, v in random_model(args, seed=1).state_dict().items()}
    params = {k: v for k, v in cfg.items() if k not in ("vocab_size", "max_seq_len")}
    write_meta(root / "meta", params, sd, n_shards=2)
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config(args)))
    save_file({k: v.contiguous() for k, v in hf_state_dict(sd, args).items()}, str(hf / "model.safetensors"))
    return root


@pytest.fixture(scope="module", params=[2, 3])
def result(request, folder):
    from llama_lite.parallel import launch

    n = request.param
    proc = launch(n, [__file__, "worker", folder], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return n, json.loads((folder / f"result-{n}.json").read_text())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_logits_equal_unsharded(result, name):
    from llama_lite import ModelArgs
    from llama_lite.parallel import local_heads

    n, r = result
    assert r["backend"] == "gloo"
    assert r[name]["diff"] < TOL, r[name]
    assert r[name]["perturbed_diff"] > 100 * TOL  # one changed weight on one rank shows
    assert r[name]["local_params"] == r[name]["expected_local"] < r[name]["full_params"]
    assert r[name]["cache_heads"] == local_heads(ModelArgs(**CONFIGS[name]), n)[1]


def test_meta_shards_load_without_merging(result):
    n, r = result
    assert r["meta"]["diff"] < TOL, r["meta"]
    if n == 2:  # shard count == world size: rank r opens consolidated.0r.pth and nothing else
        assert r["meta"]["files_read"] == [["consolidated.00.pth"], ["consolidated.01.pth"]]
    else:  # 3 ranks over 2 shards: the middle rank's slices straddle both files
        assert [len(f) for f in r["meta"]["files_read"]] == [1, 2, 1]


def test_hf_safetensors_load_sharded(result):
    n, r = result
    assert r["hf"]["diff"] < TOL, r["hf"]


def test_world_size_that_does_not_divide_heads_is_refused(result):
    n, r = result
    assert r["error"] and "heads" in r["error"] and str(n) in r["error"]


def test_check_world_size_messages():
    from llama_lite import ModelArgs
    from llama_lite.parallel import check_world_size, local_heads

    smol = ModelArgs.from_name("smollm2-135m")  # 9 query heads, 3 kv heads
    assert local_heads(smol, 3) == (3, 1)
    mqa = ModelArgs(dim=64, n_heads=4, n_kv_heads=1, hidden_dim=128, vocab_size=32)
    assert local_heads(mqa, 4) == (1, 1)  # 4 ranks: the one kv head replicated on each
    with pytest.raises(ValueError, match=r"9 query heads.*2 processes.*1, 3, 9"):
        check_world_size(smol, 2)
    big = ModelArgs.from_name("llama2-70b")  # 64 heads, 8 kv heads: 8 ranks hold one kv head each
    assert local_heads(big, 8) == (8, 1) and local_heads(big, 16) == (4, 1)
    with pytest.raises(ValueError, match="key/value heads"):
        check_world_size(ModelArgs(dim=192, n_heads=24, n_kv_heads=8), 12)
    with pytest.raises(ValueError, match="hidden size"):
        check_world_size(ModelArgs(dim=64, n_heads=4, hidden_dim=130, vocab_size=32), 4)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    worker(Path(sys.argv[2]))
