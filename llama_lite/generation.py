"""Notebook 06: turning next-token logits into text. Names and behaviour follow Meta's
llama/generation.py: Llama.build, generate, text_completion, chat_completion, sample_top_p."""
from __future__ import annotations

import math
import numbers
import operator
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import detect_format, load_checkpoint
from .model import Transformer
from .tokenizer import Message, Tokenizer, tokenizer_file


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    reaches p, renormalize, draw one. probs (bsz, vocab) -> token ids (bsz, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # tokens whose preceding mass already reaches p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None) -> torch.Tensor:
    """logits (bsz, vocab) -> next token ids (bsz,). temperature 0 is greedy."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    return sample_top_p(probs, top_p).reshape(-1)


MIN_TEMPERATURE = 1e-3  # below it (but above 0) the scaled logits overflow float32: use 0, greedy


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_sampling(temperature: float, top_p: float, top_k: int | None, max_gen_len: int | None) -> None:
    """The sampling settings' rules, checked before any work:
    temperature is 0 (greedy) or a finite number >= MIN_TEMPERATURE (0.001): smaller positive
    values would divide the logits into inf/nan, and their limit is greedy anyway, so pass 0;
    top_p is a number in (0, 1]; top_k is None or an integer >= 1; max_gen_len an integer >= 1."""
    if not _is_number(temperature) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if math.isinf(temperature):
        raise ValueError(f"temperature must be finite (0 is greedy; a large finite value is near-uniform), "
                         f"got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature!r} is too small to sample with: use 0 for greedy decoding "
                         f"(its limit) or a value >= {MIN_TEMPERATURE}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {top_k!r}")
    if max_gen_len is not None and (not _is_int(max_gen_len) or max_gen_len < 1):
        raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")


def check_prompt_tokens(prompt_tokens, vocab_size: int) -> list[list[int]]:
    """A list of prompts, each a non-empty list of integer token ids in [0, vocab_size);
    returns them as plain lists of ints. Floats are refused, not truncated."""
    if isinstance(prompt_tokens, (str, bytes, dict)) or not hasattr(prompt_tokens, "__len__"):
        raise TypeError(f"prompt_tokens is a list of prompts, each a list of token ids; got "
                        f"{type(prompt_tokens).__name__}")
    if len(prompt_tokens) == 0:
        raise ValueError("no prompts: prompt_tokens needs at least one prompt (a list of token ids)")
    out = []
    for i, t in enumerate(prompt_tokens):
        if _is_int(t) or isinstance(t, (str, bytes)) or not hasattr(t, "__len__"):
            raise TypeError(f"prompt {i} is {t!r}, not a list of token ids; prompt_tokens is a list of prompts "
                            "(wrap a single prompt in a list)")
        if len(t) == 0:
            raise ValueError(f"empty prompt: prompt {i} has no tokens; every prompt needs at least one token")
        ids = []
        for x in t:
            try:
                x = operator.index(x)  # ints, numpy/torch integers; a float is refused, not truncated
            except TypeError:
                raise TypeError(f"token ids must be integers; prompt {i} holds {x!r} "
                                f"({type(x).__name__})") from None
            if not 0 <= x < vocab_size:
                raise ValueError(f"token id {x} in prompt {i} is outside the vocabulary (0 .. {vocab_size - 1})")
            ids.append(x)
        out.append(ids)
    return out


def generation_lengths(prompt_tokens: Sequence[Sequence[int]], max_gen_len: int,
                       max_seq_len: int) -> tuple[int, int, int]:
    """(shortest prompt, longest prompt, total length) of a generation; as Meta's reference, it
    stops at the context's end."""
    min_len = min(len(t) for t in prompt_tokens)
    max_len = max(len(t) for t in prompt_tokens)
    if max_len >= max_seq_len:
        raise ValueError(
            f"the prompt is {max_len} tokens but the model's context (max_seq_len) is {max_seq_len}, "
            "leaving no room to generate; shorten the prompt"
        )
    return min_len, max_len, min(max_seq_len, max_gen_len + max_len)


# One lock per model: generation installs its KV cache on the model, so two calls on one model
# at once would overwrite each other's cache. Keyed weakly, and not an attribute of the model,
# so copy.deepcopy(model) and pickling keep working.
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def check_seed(seed) -> None:
    if not _is_int(seed) or not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) (torch.manual_seed's range), got {seed!r}")


class Llama:
    """A model and its tokenizer. Thread-safe: generate and beam_search (and so text_completion
    and chat_completion) hold a lock on the model while they run, because each call installs its
    KV cache on the model; calls from several threads on one Llama (or on Llamas sharing a model)
    each get the right answer, one after another, not in parallel."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @staticmethod
    def build(ckpt_dir=None, tokenizer_path=None, max_seq_len: int | None = None,
              device=None, dtype=None, seed: int | None = None, progress: bool = False,
              quantize: str | None = None, plan=None, compile: bool = False) -> Llama:
        """Load a checkpoint and its tokenizer. No arguments: the embedded SmolLM2-135M-Instruct
        on the CPU. ckpt_dir: Meta's folder (params.json, consolidated.*.pth), Hugging Face's
        folder (config.json, *.safetensors) or a .gguf file. plan: a llama_lite.devices.FitPlan
        (plan_fit's answer), whose device, dtype, quantize and max_seq_len are used.
        quantize: None; "int8", int8 weights (memory: a 7B on a 16 GB GPU); or "w8a8", int8
        weights and activations on an x86 CPU with AVX512-VNNI (speed: see README's Benchmarks).
        compile: compile the model's blocks (llama_lite.fast.compile_model); the first
        generation then waits for the compiler, later ones (and later processes) do not."""
        if isinstance(ckpt_dir, str) and not ckpt_dir.strip():
            raise ValueError("ckpt_dir is an empty string; pass a checkpoint path, or None for the embedded model")
        if plan is not None:
            device, dtype, quantize = plan.device, plan.dtype, plan.quantize
            max_seq_len = plan.max_seq_len  # plan.batch_size sized its KV cache estimate; generate sizes the real one
        if compile:
            from .fast import refuse_compile

            refuse_compile(quantize)
        if seed is not None:
            check_seed(seed)
            torch.manual_seed(seed)
        if ckpt_dir is not None and tokenizer_path is None and Path(ckpt_dir).is_dir():
            detect_format(Path(ckpt_dir))  # a folder in neither format: the loader's message, not the tokenizer's
        tok_file = tokenizer_file(ckpt_dir, tokenizer_path)
        if ckpt_dir is None and device is None:
            device = "cpu"  # the embedded model is the CPU default, even where a GPU exists
        start = time.perf_counter()
        model, _ = load_checkpoint(ckpt_dir, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                  progress=progress, quantize=quantize)
        tokenizer = Tokenizer.load(tok_file)
        if tokenizer.n_words != model.params.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary is "
                f"{model.params.vocab_size}: they come from different models"
            )
        if compile:
            from .fast import compile_model  # imports torch's compiler stack: only when asked

            compile_model(model)
        llama = Llama(model, tokenizer)
        llama.load_seconds = time.perf_counter() - start
        return llama

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, top_k: int | None = None, logprobs: bool = False, echo: bool = False,
                 use_cache: bool = True) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt until EOS or max_gen_len new tokens. Returns the new tokens
        (with the prompt if echo) and, if logprobs, each token's log-probability.
        prompt_tokens: a list of prompts, each a list of integer ids in [0, vocab_size).
        Thread-safe: holds the model's lock while it runs (see Llama)."""
        check_sampling(temperature, top_p, top_k, max_gen_len)
        prompt_tokens = check_prompt_tokens(prompt_tokens, self.model.params.vocab_size)
        with model_lock(self.model):
            return self._generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, use_cache)

    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, use_cache):
        bsz = len(prompt_tokens)
        min_prompt_len, _, total_len = generation_lengths(prompt_tokens, max_gen_len, self.model.params.max_seq_len)
        device = self.device
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else 0,
                            dtype=torch.long, device=device)
        input_text_mask = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            input_text_mask[k, : len(t)] = True
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
        stop = torch.tensor(self.tokenizer.stop_ids, device=device)

        if use_cache:
            self.model.setup_cache(bsz, total_len)
        else:
            self.model.clear_cache()
        try:
            prev_pos = 0
            eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
            for cur_pos in range(min_prompt_len, total_len):
                if use_cache:  # only the tokens the cache has not seen
                    logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos)
                else:  # recompute the whole sequence every step
                    logits = self.model(tokens[:, :cur_pos], 0)
                if logprobs:
                    # log p of every token the forward just scored (the prompt's, then each new one)
                    lp = -F.cross_entropy(logits.transpose(1, 2), tokens[:, cur_pos - logits.shape[1] + 1: cur_pos + 1],
                                          reduction="none")
                    token_logprobs[:, cur_pos - logits.shape[1] + 1: cur_pos + 1] = lp
                next_token = sample_next(logits[:, -1], temperature, top_p, top_k)
                # Rows whose prompt is longer than cur_pos keep their own prompt token.
                next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                if logprobs:
                    token_logprobs[:, cur_pos] = torch.log_softmax(logits[:, -1], -1).gather(
                        -1, next_token[:, None]).squeeze(-1)
                eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_token, stop)
                prev_pos = cur_pos
                if bool(eos_reached.all()):
                    break
        finally:
            self.model.clear_cache()  # the cache is per call; free it

        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            end = min(len(prompt_tokens[i]) + max_gen_len, prev_pos + 1)
            toks = toks[start:end]
            probs = token_logprobs[i][start:end].tolist() if logprobs else None
            for j, t in enumerate(toks):
                if (echo and j < len(prompt_tokens[i])) or t not in self.tokenizer.stop_ids:
                    continue
                toks = toks[:j]  # cut at the first stop token after the prompt
                probs = probs[:j] if probs is not None else None
                break
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

    def beam_search(self, prompt_tokens: Sequence[int], num_beams: int, max_gen_len: int,
                    length_penalty: float = 1.0, early_stopping: bool | str = False) -> tuple[list[int], float]:
        """Beam search over one prompt (llama_lite.beam_search.beam_search), stopping at this
        tokenizer's stop ids. Returns the best hypothesis' new tokens and its score."""
        from .beam_search import beam_search  # it builds on this module's checks: imported here, one-way

        return beam_search(self.model, prompt_tokens, num_beams, max_gen_len, self.tokenizer.stop_ids,
                           length_penalty, early_stopping)

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        top_k: int | None = None, max_gen_len: int | None = None, logprobs: bool = False,
                        echo: bool = False) -> list[dict]:
        if isinstance(prompts, str):
            raise TypeError("prompts is a list of strings; wrap a single prompt in a list")
        if isinstance(prompts, dict) or not hasattr(prompts, "__len__") or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str: prompts is a list of strings")
            if not p:
                raise ValueError(f"empty prompt: prompt {i} is an empty string; give some text to continue")
        check_sampling(temperature, top_p, top_k, max_gen_len)
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=self.tokenizer.add_bos, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo)
        out = []
        for i, t in enumerate(tokens):
            item = {"generation": self.tokenizer.decode(t)}
            if logprobs:
                item.update(tokens=[self.tokenizer.decode([x]) for x in t], logprobs=lps[i])
            out.append(item)
        return out

    def chat_completion(self, dialogs: list[list[Message]], temperature: float = 0.6, top_p: float = 0.9,
                        top_k: int | None = None, max_gen_len: int | None = None,
                        logprobs: bool = False) -> list[dict]:
        if isinstance(dialogs, (str, dict)) or not hasattr(dialogs, "__len__") or len(dialogs) == 0:
            raise ValueError(f"dialogs must be a non-empty list of dialogs (each a list of messages), got {dialogs!r}")
        if isinstance(dialogs[0], dict):
            raise TypeError("dialogs is a list of dialogs (each a list of messages); wrap a single dialog in a list")
        check_sampling(temperature, top_p, top_k, max_gen_len)
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode_dialog(d) for d in dialogs]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs)
        out = []
        for i, t in enumerate(tokens):
            item = {"generation": {"role": "assistant", "content": self.tokenizer.decode(t).strip()}}
            if logprobs:
                item.update(tokens=[self.tokenizer.decode([x]) for x in t], logprobs=lps[i])
            out.append(item)
        return out


