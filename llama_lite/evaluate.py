"""Measuring a model on real text: the shipped sample and perplexity."""
from collections.abc import Sequence
from importlib import resources

import torch
import torch.nn.functional as F


def sample_text() -> str:
    """The opening of the US Declaration of Independence (public domain): a real English text
    every notebook can score the model on, offline."""
    return resources.files("llama_lite").joinpath("data/declaration.txt").read_text(encoding="utf-8").strip()


@torch.inference_mode()
def perplexity(model, tokens: Sequence[int], stepwise: bool = False) -> float:
    """exp(mean negative log-likelihood) of tokens[1:] given their prefixes: in one forward, or
    with stepwise=True one token per forward through a KV cache, as decoding runs. In float the
    two agree to rounding. With int8 activations (W8A8) they differ more: the cached and the
    uncached forward differ in the last bits, one activation then rounds to the neighbouring
    integer, and that step grows through the layers; the two are two draws of the rounding
    noise, and their spread is how precisely int8's cost is known."""
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    if len(tokens) > model.params.max_seq_len:
        raise ValueError(f"{len(tokens)} tokens exceed the model's context (max_seq_len={model.params.max_seq_len}); "
                         "score a shorter slice")
    x = torch.tensor([list(tokens)], device=model.tok_embeddings.weight.device)
    if not stepwise:
        logits = model(x[:, :-1])  # (1, n-1, vocab)
    else:
        from .generation import model_lock  # the cache is the model's: not while a generate runs

        with model_lock(model):
            model.setup_cache(1, x.shape[1])
            try:
                logits = torch.cat([model(x[:, i:i + 1], i) for i in range(x.shape[1] - 1)], dim=1)  # (1, n-1, vocab)
            finally:
                model.clear_cache()
    nll = F.cross_entropy(logits[0], x[0, 1:])
    return float(torch.exp(nll))
