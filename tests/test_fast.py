"""llama_lite.fast: the taught blocks, compiled in place, give the eager model's logits and
greedy tokens, with a handful of graphs for every decode position (no recompile per position).
A tiny config keeps the cold compile to seconds; SmolLM2's compile is timed by
benchmarks/decode_cpu.py and the CLI's --compile --stats."""
import pytest
import torch

from conftest import random_model
from llama_lite import Llama, ModelArgs
from llama_lite.fast import compile_model, compiled_copy, is_compiled
from llama_lite.quantize import quantize_model_int8

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


def test_compiled_blocks_equal_eager_with_a_handful_of_graphs():
    from torch._dynamo.utils import counters

    model = random_model(ARGS)
    torch._dynamo.reset()
    counters.clear()
    twin = compiled_copy(model)  # the same weight tensors
    assert is_compiled(twin) and not is_compiled(model)
    assert not any(p.requires_grad for p in twin.parameters())
    assert twin.layers[0].attention.wq.weight.data_ptr() == model.layers[0].attention.wq.weight.data_ptr()
    for prompt, n in (([5, 17, 42, 8, 3], 24), ([9, 9, 1], 10)):
        eager_tokens, eager_logits = greedy_logits(model, prompt, n)
        tokens, logits = greedy_logits(twin, prompt, n)
        assert tokens == eager_tokens
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    # 36 forwards at 34 positions and two prompt lengths, through 3 layers: at least a prompt
    # graph and a decode graph were compiled (so the compiler did run), and a few more at most
    # where dynamo first sees a shape change and marks it dynamic; a compile per position or per
    # layer would make dozens.
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 6, dict(counters["stats"])


def test_compiled_int8_model_equals_eager_int8():
    model = quantize_model_int8(random_model(ARGS))
    eager_tokens, eager_logits = greedy_logits(model, [3, 1, 4, 1, 5], 8)
    with pytest.raises(ValueError, match="needs a float model"):
        compiled_copy(model)
    compile_model(model)  # in place
    tokens, logits = greedy_logits(model, [3, 1, 4, 1, 5], 8)
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_build_with_compile_compiles_the_blocks(smollm2_path):
    llama = Llama.build(compile=True)  # compiling itself waits for the first forward
    assert is_compiled(llama.model) and len(llama.model.layers) == 30
    assert not is_compiled(Llama.build().model)
