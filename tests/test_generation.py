"""The real SmolLM2-135M-Instruct weights: llama_lite against transformers loading the same GGUF."""
import pytest
import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]

VARIED_TEXT = (
    "Hello world! Ünïcödé façade, naïve café — 東京タワー, Привет мир, emoji 🦙🚀.\n"
    "Digits: 3.14159, 1,000,000 and 2024-11-23; code:\n"
    "    def f(x):\n\t\treturn x**2  # comment\n"
    "   multiple   spaces\n\n\nnew lines, tabs\tand <|im_start|> as plain text? "
)


def test_tokenizer_ids_equal_reference(llama, hf_smollm2):
    _, hf_tok = hf_smollm2
    ours = llama.tokenizer.encode(VARIED_TEXT, bos=False, eos=False)
    assert ours == hf_tok(VARIED_TEXT, add_special_tokens=False)["input_ids"]
    assert llama.tokenizer.decode(ours) == VARIED_TEXT


def test_chat_template_tokens_equal_reference(llama, hf_smollm2):
    _, hf_tok = hf_smollm2
    for dialog in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And 2+2?"}],
    ):
        ref = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert llama.tokenizer.encode_dialog(dialog) == list(ref)


def test_last_position_logits_equal_reference(llama, hf_smollm2):
    hf, _ = hf_smollm2
    for prompt in PROMPTS:
        x = torch.tensor([llama.tokenizer.encode(prompt, bos=False, eos=False)])
        with torch.no_grad():
            ours, ref = llama.model(x)[0, -1], hf(x).logits[0, -1]
        span = (ref.max() - ref.min()).item()
        assert (ours - ref).abs().max().item() / span <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_equal_reference(llama, hf_smollm2, prompt):
    hf, _ = hf_smollm2
    ids = llama.tokenizer.encode(prompt, bos=False, eos=False)
    (ours,), _ = llama.generate([ids], 32, temperature=0)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    # transformers keeps the EOS token it stopped on; llama_lite, as Meta's code, cuts it.
    if llama.tokenizer.eos_id in ref:
        ref = ref[: ref.index(llama.tokenizer.eos_id)]
    assert ours == ref


def test_cached_and_uncached_decoding_agree(llama):
    ids = llama.tokenizer.encode(PROMPTS[2], bos=False, eos=False)
    (cached,), _ = llama.generate([ids], 24, temperature=0, use_cache=True)
    (uncached,), _ = llama.generate([ids], 24, temperature=0, use_cache=False)
    assert cached == uncached and len(cached) > 0


def test_batched_generation_equals_one_by_one(llama):
    prompts = [llama.tokenizer.encode(p, bos=False, eos=False) for p in PROMPTS]
    batched, _ = llama.generate(prompts, 12, temperature=0)
    single = [llama.generate([p], 12, temperature=0)[0][0] for p in prompts]
    assert batched == single


def test_chat_answers(llama):
    out = llama.chat_completion([[{"role": "user", "content": "What is the capital of France?"}]],
                                temperature=0, max_gen_len=32)
    assert "Paris" in out[0]["generation"]["content"]


def test_seeded_sampling_is_reproducible(llama):
    ids = llama.tokenizer.encode(PROMPTS[0], bos=False, eos=False)
    torch.manual_seed(3)
    a, _ = llama.generate([ids], 10, temperature=0.8, top_p=0.9, top_k=50)
    torch.manual_seed(3)
    b, _ = llama.generate([ids], 10, temperature=0.8, top_p=0.9, top_k=50)
    assert a == b
