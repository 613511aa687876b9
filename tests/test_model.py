"""llama_lite's Transformer (llama_lite/model.py) against transformers' LlamaForCausalLM: on the
same random weights (MHA, GQA, MQA, tied embeddings), and on the real SmolLM2-135M-Instruct weights
(transformers loading the same GGUF). Cached decoding against this forward: tests/test_kv_cache.py."""
import pytest
import torch

from conftest import PROMPTS, random_model, to_hf
from llama_lite import ModelArgs

CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gqa": dict(n_heads=8, n_kv_heads=2, tie_embeddings=False),
    "mqa": dict(n_heads=4, n_kv_heads=1, tie_embeddings=False),
    "gqa-tied": dict(n_heads=6, n_kv_heads=3, tie_embeddings=True),
}


def tiny(**kw):
    base = dict(dim=96, n_layers=3, vocab_size=211, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    args = tiny(**CONFIGS[name])
    model = random_model(args)
    hf = to_hf(model)
    tokens = torch.randint(0, args.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(tokens), hf(tokens).logits
    assert ours.shape == (2, 37, args.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_layout_mixup_is_caught():
    # Without the q/k permutation the reference disagrees: the comparison above can fail.
    args = tiny(**CONFIGS["gqa"])
    model = random_model(args)
    hf = to_hf(model)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            hf.model.layers[i].self_attn.q_proj.weight.copy_(layer.attention.wq.weight)
            hf.model.layers[i].self_attn.k_proj.weight.copy_(layer.attention.wk.weight)
        tokens = torch.randint(0, args.vocab_size, (1, 16))
        assert (model(tokens) - hf(tokens).logits).abs().max().item() > 1e-2


def test_smollm2_last_position_logits_equal_reference(llama, hf_smollm2):
    hf, _ = hf_smollm2
    for prompt in PROMPTS:
        x = torch.tensor([llama.tokenizer.encode(prompt, bos=False, eos=False)])
        with torch.no_grad():
            ours, ref = llama.model(x)[0, -1], hf(x).logits[0, -1]
        span = (ref.max() - ref.min()).item()
        assert (ours - ref).abs().max().item() / span <= 1e-3


def test_forward_errors_are_clear():
    args = tiny(**CONFIGS["gqa"])
    model = random_model(args)
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="setup_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), start_pos=5)
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_perplexity_token_by_token_equals_one_forward():
    """evaluate.perplexity(stepwise=True) scores through the KV cache, one token per forward;
    in float it is the one-forward number, and it leaves the model without a cache."""
    from llama_lite.evaluate import perplexity

    torch.manual_seed(0)
    model = random_model(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                                   max_seq_len=32))
    tokens = torch.randint(0, 97, (20,)).tolist()
    assert perplexity(model, tokens, stepwise=True) == pytest.approx(perplexity(model, tokens), rel=1e-5)
    assert not model.caches


def test_greedy_lead_is_the_chosen_tokens_smallest_margin():
    """evaluate.greedy_lead: for greedy tokens, the smallest (chosen - best other) logit over the
    steps, as the cached decode computed them; negative where a token was not the first choice."""
    from llama_lite.evaluate import greedy_lead

    torch.manual_seed(0)
    model = random_model(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                                   max_seq_len=32))
    prompt, tokens, margins = [5, 17, 42], [5, 17, 42], []
    with torch.inference_mode():
        for _ in range(6):
            top2 = model(torch.tensor([tokens]))[0, -1].topk(2)
            margins.append(float(top2.values[0] - top2.values[1]))
            tokens.append(int(top2.indices[0]))
    generated = tokens[len(prompt):]
    assert greedy_lead(model, prompt, generated) == pytest.approx(min(margins), abs=1e-5)
    runner_up = generated[:2] + [(generated[2] + 1) % 97]  # not the argmax at step 3
    assert greedy_lead(model, prompt, runner_up) < 0
    with pytest.raises(ValueError, match="at least one generated token"):
        greedy_lead(model, prompt, [])
