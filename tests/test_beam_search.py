"""Beam search (notebook 06, llama_lite/beam_search.py): llama_lite's batched beam search against
transformers' generate. (Its bad arguments: tests/test_errors.py; --num-beams: tests/test_cli.py.)"""
import pytest
import torch

EOS = 2  # SmolLM2's <|im_end|>, transformers' generation_config.eos_token_id for this GGUF

# (prompt, max_new_tokens): plain text continuations run to the length limit; chat-template
# prompts with enough room end with EOS (the test asserts which happened).
TEXT = ["The capital of France is", "Once upon a time, in a small village,"]
CHAT = ["What is the capital of France?", "Say hello."]


def prompts(tok):
    return ([(tok.encode(p, bos=False, eos=False), 12) for p in TEXT]
            + [(tok.encode_dialog([{"role": "user", "content": c}]), 40) for c in CHAT])


def reference(hf, ids, n, k, **kw):
    out = hf.generate(torch.tensor([ids]), num_beams=k, do_sample=False, max_new_tokens=n,
                      output_scores=True, return_dict_in_generate=True, **kw)
    ref = out.sequences[0, len(ids):].tolist()
    return ref, out.sequences_scores[0].item() if k > 1 else None


@pytest.mark.parametrize("k", [2, 4, 8])
def test_beam_search_equals_transformers(llama, hf_smollm2, k):
    hf, _ = hf_smollm2
    reached = []
    for ids, n in prompts(llama.tokenizer):
        ours, score = llama.beam_search(ids, k, n)
        ref, ref_score = reference(hf, ids, n, k)
        ended = EOS in ref
        reached.append(ended)
        if ended:  # transformers keeps the EOS token; llama_lite cuts it, as generate does
            assert ref[-1] == EOS and ref.count(EOS) == 1
            ref = ref[:-1]
        assert ours == ref, (k, llama.tokenizer.decode(ids))
        assert score == pytest.approx(ref_score, abs=1e-4)
    # both kinds of ending were exercised: at the length limit and at EOS
    assert reached == [False, False, True, True]


@pytest.mark.parametrize("length_penalty,early_stopping", [(0.0, True), (2.0, "never"), (-1.0, False)])
def test_length_penalty_and_early_stopping_equal_transformers(llama, hf_smollm2, length_penalty, early_stopping):
    hf, _ = hf_smollm2
    ids, n = prompts(llama.tokenizer)[2]
    ours, score = llama.beam_search(ids, 4, n, length_penalty=length_penalty, early_stopping=early_stopping)
    ref, ref_score = reference(hf, ids, n, 4, length_penalty=length_penalty, early_stopping=early_stopping)
    # a large length_penalty favours long hypotheses: the winner may stop at the length limit
    # instead of at EOS, which generate keeps in its output and beam_search cuts, as generate() does
    assert ours == (ref[:-1] if ref[-1] == EOS else ref) and score == pytest.approx(ref_score, abs=1e-4)


def test_score_is_mean_log_probability_of_the_tokens(llama):
    ids, n = prompts(llama.tokenizer)[3]
    ours, score = llama.beam_search(ids, 4, n)  # length_penalty=1: the mean over tokens, EOS included
    full = torch.tensor([ids + ours + [EOS]])
    with torch.no_grad():
        lp = torch.log_softmax(llama.model(full)[0, len(ids) - 1: -1], -1)
    token_lp = lp.gather(-1, full[0, len(ids):, None])
    assert score == pytest.approx(token_lp.mean().item(), abs=1e-4)


def test_one_beam_is_greedy(llama, hf_smollm2):
    hf, _ = hf_smollm2
    for ids, n in prompts(llama.tokenizer)[::3]:  # one at the length limit, one that ends with EOS
        ours, _ = llama.beam_search(ids, 1, n)
        (greedy,), _ = llama.generate([ids], n, temperature=0)
        ref, _ = reference(hf, ids, n, 1)
        assert ours == greedy == [t for t in ref if t != EOS]


def test_kv_cache_is_batched_over_beams_and_freed(llama, monkeypatch):
    from llama_lite.kv_cache import KVCache

    calls = []
    reorder = KVCache.reorder
    monkeypatch.setattr(KVCache, "reorder", lambda self, index: calls.append(index.shape) or reorder(self, index))
    shapes = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda t, s=0: shapes.append(tuple(t.shape)) or forward(t, s))
    ids = llama.tokenizer.encode(TEXT[0], bos=False, eos=False)
    out, _ = llama.beam_search(ids, 4, 6)
    assert len(out) == 6
    assert shapes == [(1, len(ids))] + [(4, 1)] * 5  # prompt prefilled once, then one row per beam
    assert calls and all(s == (4,) for s in calls)
    assert llama.model.caches == []


def test_function_form_stop_ids():
    """beam_search(model, prompt, stop ids) without a Llama: a stop id outside the vocabulary (a
    tokenizer's -1 when it has no EOS) never matches, so every beam runs to max_gen_len; stop_ids
    that are not integer ids are refused with a clear error."""
    from conftest import random_model
    from llama_lite import ModelArgs
    from llama_lite.beam_search import beam_search

    model = random_model(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=11, multiple_of=16, max_seq_len=32))
    out, score = beam_search(model, [1, 2, 3], 3, 7, stop_ids=[-1])
    assert len(out) == 7 and score < 0
    with pytest.raises(TypeError, match="stop_ids is a list of token ids"):
        beam_search(model, [1, 2, 3], 3, 7, stop_ids=None)
    with pytest.raises(TypeError, match="stop_ids must be integer token ids"):
        beam_search(model, [1, 2, 3], 3, 7, stop_ids=[2.0])
