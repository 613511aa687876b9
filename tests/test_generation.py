"""Llama.generate and chat_completion (llama_lite/generation.py) on the real SmolLM2-135M-Instruct
weights, against transformers loading the same GGUF; and one Llama shared by several threads."""
import copy
import threading
import warnings

import pytest
import torch

from conftest import PROMPTS
from llama_lite import Llama, ModelArgs, Transformer
from llama_lite import generation


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


# -- two threads on one Llama --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(llama):
    """A tiny random model with SmolLM2's tokenizer: fast, and its greedy continuations differ
    from prompt to prompt, so a call that read another call's KV cache shows."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=llama.model.params.vocab_size, max_seq_len=64)
    return Llama(Transformer(args).eval(), llama.tokenizer)


def test_threads_share_one_llama(tiny_llama):
    jobs = [("gen", [[7 + i, 100 + 13 * i, 2000 + i]]) for i in range(3)]
    jobs += [("gen", [[5, 6, 7, 8], [9 + 100 * i]]) for i in range(2)]  # batches of two lengths
    jobs += [("beam", [300 + i, 40 + i]) for i in range(2)]

    def run(job):
        kind, prompt = job
        if kind == "gen":
            return tiny_llama.generate(prompt, 8, temperature=0.0)[0]
        return tiny_llama.beam_search(prompt, 2, 6)[0]

    expected = [run(j) for j in jobs]
    assert len({str(e) for e in expected}) == len(jobs)  # every job's answer is its own
    results, errors = {}, []

    def worker(w):
        try:
            for r in range(2):
                order = list(range(len(jobs)))[w + r:] + list(range(len(jobs)))[:w + r]  # every thread its own order
                for i in order:
                    results[(w, r, i)] = run(jobs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 3 * 2 * len(jobs)
    wrong = [k for k, v in results.items() if v != expected[k[2]]]
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent calls differ from the sequential answer"
    assert not tiny_llama.model.caches  # every call freed its cache


def test_the_lock_is_per_model_and_copies_still_work(tiny_llama):
    other = Llama(tiny_llama.model, tiny_llama.tokenizer)  # a second Llama on the same model
    assert generation.model_lock(other.model) is generation.model_lock(tiny_llama.model)
    clone = copy.deepcopy(tiny_llama.model)  # the lock is not an attribute: deepcopy works
    assert generation.model_lock(clone) is not generation.model_lock(tiny_llama.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Llama(clone, tiny_llama.tokenizer).generate([[1, 2]], 4, temperature=0)[0] == \
            tiny_llama.generate([[1, 2]], 4, temperature=0)[0]
