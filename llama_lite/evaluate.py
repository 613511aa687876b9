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
    with stepwise=True one token per forward through a KV cache, as decoding runs (the same
    number in float; int8 activations take another kernel for one token than for several)."""
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
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
