"""Notebook 06: beam search over one prompt, as transformers' generate(num_beams=k, do_sample=False).

A function of (model, prompt, stop ids); `Llama.beam_search` is the thin front that passes its
tokenizer's stop ids.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .generation import check_prompt_tokens, generation_lengths, model_lock
from .model import Transformer


@torch.inference_mode()
def beam_search(model: Transformer, prompt_tokens: Sequence[int], num_beams: int, max_gen_len: int,
                stop_ids: Sequence[int], length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> tuple[list[int], float]:
    """Beam search over one prompt, as transformers' generate(num_beams=k, do_sample=False).

    All k beams run as one batch of k rows: the prompt is prefilled once, its keys and
    values copied to every row of the static KV cache, and after each step the cache rows
    are reordered (KVCache.reorder) so each surviving beam carries its parent's past.
    Each step ranks the 2k best (beam, token) extensions by summed log-probability; the
    best k that do not end in EOS keep running, and those among the top k that end in EOS
    (or reach max_gen_len) become finished hypotheses scored
    sum(log p) / generated_len ** length_penalty (generated_len counts the EOS token).
    early_stopping: True stops when k hypotheses are finished; False (transformers' default)
    also stops when the best running beam, scored at its current length, cannot beat the
    worst finished one; "never" estimates that bound at max length when length_penalty > 0.
    num_beams=1 is greedy search (as generate(num_beams=1)): one beam that stops at its
    first finished hypothesis.

    stop_ids: the tokens that end a hypothesis (EOS, and a chat model's end-of-turn tokens).

    Returns the best hypothesis' new tokens (without the prompt and, as generate, without
    the stop token) and its score. Thread-safe: holds the model's lock while it runs.
    """
    if isinstance(prompt_tokens, (list, tuple)) and prompt_tokens and hasattr(prompt_tokens[0], "__len__") \
            and getattr(prompt_tokens[0], "ndim", 1) != 0:
        raise ValueError("beam_search takes one prompt, a list of token ids (not a list of prompts)")
    V = model.params.vocab_size
    stop_ids = check_stop_ids(stop_ids)
    check_beam_search(num_beams, max_gen_len, length_penalty, early_stopping, V, len(stop_ids))
    (prompt_tokens,) = check_prompt_tokens([prompt_tokens], V)
    with model_lock(model):
        return _beam_search(model, prompt_tokens, num_beams, max_gen_len, stop_ids, length_penalty, early_stopping)


def check_stop_ids(stop_ids) -> list[int]:
    """The ids that end a hypothesis, as a list of ints. An id outside the vocabulary (a
    tokenizer's -1 when it has no EOS) is allowed: the model never produces it, so it never stops."""
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
        raise TypeError(f"stop_ids is a list of token ids (e.g. the tokenizer's stop_ids), got {stop_ids!r}")
    ids = list(stop_ids)
    try:
        if any(isinstance(i, bool) for i in ids):
            raise TypeError
        return [operator.index(i) for i in ids]  # ints, numpy/torch integers; not floats
    except TypeError:
        raise TypeError(f"stop_ids must be integer token ids, got {ids!r}") from None


def check_beam_search(num_beams: int, max_gen_len: int, length_penalty: float, early_stopping, vocab_size: int,
                      n_stop: int = 1) -> None:
    """beam_search's own settings, checked before any work."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1 (1 is greedy), got {num_beams!r}")
    if num_beams > vocab_size:
        raise ValueError(f"num_beams={num_beams} is larger than the vocabulary ({vocab_size} tokens): the first "
                         "step could not give every beam its own token; use fewer beams")
    if max(2, 1 + n_stop) > vocab_size:
        # each step ranks max(2, 1 + n_stop) x num_beams extensions out of num_beams x vocab_size
        raise ValueError(f"a vocabulary of {vocab_size} is too small for beam search with {n_stop} stop token(s)")
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1:
        raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) or \
            not float("-inf") < length_penalty < float("inf"):
        raise ValueError(f"length_penalty must be a finite number (1.0 averages log-probabilities over the "
                         f"length, 0.0 sums them), got {length_penalty!r}")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise ValueError(f"early_stopping must be True, False or 'never' (as transformers), got {early_stopping!r}")


def _beam_search(model: Transformer, prompt_tokens: list[int], num_beams: int, max_gen_len: int,
                 stop_ids: list[int], length_penalty: float, early_stopping) -> tuple[list[int], float]:
    V = model.params.vocab_size
    if num_beams == 1:
        early_stopping = True  # the one beam stops when it ends: greedy search
    _, prompt_len, total_len = generation_lengths([prompt_tokens], max_gen_len, model.params.max_seq_len)
    k, device = num_beams, model.tok_embeddings.weight.device
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    n_cand = max(2, 1 + len(stop_ids)) * k  # enough that k of them do not end
    top_k_mask = torch.arange(n_cand, device=device) < k  # only these may finish a hypothesis
    NEG = -1.0e9

    # Running beams (k, total_len) and their summed log-probs; all but beam 0 start at -1e9
    # so the first step expands the prompt once, not k times. Slots past a beam's length are
    # never read (the model sees only positions it has reached), so 0 fills them.
    running = torch.zeros((k, total_len), dtype=torch.long, device=device)
    running[:, :prompt_len] = torch.tensor(prompt_tokens, dtype=torch.long, device=device)
    running_scores = torch.zeros(k, device=device)
    running_scores[1:] = NEG
    # Finished hypotheses: k slots, sorted by score, -1e9 while empty.
    finished = running.clone()
    finished_scores = torch.full((k,), NEG, device=device)
    finished_len = torch.zeros(k, dtype=torch.long, device=device)
    is_finished = torch.zeros(k, dtype=torch.bool, device=device)
    improvable = True  # can a running beam still beat the worst finished hypothesis?

    model.setup_cache(k, total_len)
    try:
        logits = model(running[:1, :prompt_len], 0)[:, -1]  # prefill once: (1, vocab)
        for cache in model.caches:  # every beam starts from the prompt's keys and values
            cache.reorder(torch.zeros(k, dtype=torch.long, device=device))
        logits = logits.expand(k, V)
        cur_len = prompt_len
        while True:
            # (k, vocab) log p of each extension, plus its beam's score, ranked across beams
            scores = (torch.log_softmax(logits.float(), dim=-1) + running_scores[:, None]).reshape(1, -1)
            cand_scores, cand = torch.topk(scores, n_cand)
            cand_scores, cand = cand_scores[0], cand[0]
            parent, token = cand // V, cand % V
            cand_seqs = running[parent]
            cand_seqs[:, cur_len] = token
            ends = torch.isin(token, stop) | (cur_len + 1 >= total_len)

            # the k best candidates that do not end keep running
            alive_scores = cand_scores + ends.to(torch.float32) * NEG
            keep = torch.topk(alive_scores, k).indices
            running, running_scores, beam_parent = cand_seqs[keep], alive_scores[keep], parent[keep]

            # those of the top k that end join the finished hypotheses if they rank
            gen_len = cur_len + 1 - prompt_len
            just_ended = ends & top_k_mask
            new_scores = cand_scores / (gen_len ** length_penalty)
            new_scores = new_scores + float(bool(is_finished.all()) and early_stopping is True) * NEG
            new_scores = new_scores + float(not improvable) * NEG
            new_scores = new_scores + (~just_ended) * NEG
            merged_scores = torch.cat([finished_scores, new_scores])
            best = torch.topk(merged_scores, k).indices
            finished = torch.cat([finished, cand_seqs])[best]
            finished_scores = merged_scores[best]
            finished_len = torch.cat([finished_len, torch.full_like(cand, gen_len)])[best]
            is_finished = torch.cat([is_finished, just_ended])[best]
            cur_len += 1

            # stop when no running beam can improve on the finished ones (transformers' heuristic)
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = total_len - prompt_len
            else:
                best_len = cur_len - prompt_len
            best_possible = running_scores[:1] / (best_len ** length_penalty)
            worst_finished = torch.where(is_finished, finished_scores.min(), NEG)
            improvable = improvable and bool((best_possible > worst_finished).any())
            all_done = bool(is_finished.all()) and early_stopping is True
            if not improvable or all_done or bool(ends.all()):
                break

            for cache in model.caches:  # each surviving beam takes its parent's past
                cache.reorder(beam_parent)
            logits = model(running[:, cur_len - 1: cur_len], cur_len - 1)[:, -1]
    finally:
        model.clear_cache()

    n = int(finished_len[0])
    out = finished[0, prompt_len: prompt_len + n].tolist()
    if out and out[-1] in stop_ids:
        out = out[:-1]
    return out, float(finished_scores[0])
