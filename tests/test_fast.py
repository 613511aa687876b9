"""llama_lite.fast: the taught blocks, compiled in place, give the eager model's logits and
greedy tokens, with one graph for every decode position (no recompiles as start_pos grows).
A tiny config keeps the cold compile to seconds; SmolLM2's compile is timed in
benchmarks/decode_cpu.py."""
import pytest
import torch

from conftest import random_model
from llama_lite import ModelArgs
from llama_lite.fast import compile_model, is_compiled

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


@torch.inference_mode()
def greedy_logits(model, prompt, n):
    """Greedy decoding through Transformer.forward with its KV cache: (tokens, logits per step)."""
    tokens, steps = list(prompt), []
    model.setup_cache(1, len(prompt) + n)
    try:
        logits = model(torch.tensor([tokens]), 0)[:, -1]
        for _ in range(n):
            steps.append(logits)
            tokens.append(int(logits.argmax()))
            logits = model(torch.tensor([tokens[-1:]]), len(tokens) - 1)[:, -1]
    finally:
        model.clear_cache()
    return tokens[len(prompt):], torch.cat(steps)


def test_compiled_blocks_equal_eager_with_one_graph_per_shape_kind():
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    model = random_model(ARGS)
    prompt = [5, 17, 42, 8, 3]
    eager_tokens, eager_logits = greedy_logits(model, prompt, 24)
    torch._dynamo.reset()
    counters.clear()
    compile_model(model)
    assert is_compiled(model)
    tokens, logits = greedy_logits(model, prompt, 24)
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    # 25 forwards at 24 different positions: a prompt graph and a decode graph (a third when
    # dynamo turns the first decode shape dynamic), shared by all layers; a per-position
    # recompile would make dozens.
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    tokens_again, _ = greedy_logits(model, [9, 9, 1], 10)  # another prompt length: no new failure
    assert len(tokens_again) == 10


def test_compiled_model_keeps_its_checks():
    model = compile_model(random_model(ARGS))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="call setup_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), 3)
