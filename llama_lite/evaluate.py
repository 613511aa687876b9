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
def perplexity(model, tokens: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of tokens[1:] given their prefixes, in one forward."""
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    x = torch.tensor([list(tokens)], device=model.tok_embeddings.weight.device)
    logits = model(x[:, :-1])  # (1, n-1, vocab)
    nll = F.cross_entropy(logits[0], x[0, 1:])
    return float(torch.exp(nll))
