"""Measuring a model on real text: the shipped sample, perplexity, how far a quantized
model's next-token distributions are from float32's (compare), and by how much a greedy
generation's tokens won (greedy_lead)."""
from collections.abc import Sequence
from importlib import resources

import torch
import torch.nn.functional as F


def sample_text() -> str:
    """The opening of the US Declaration of Independence (public domain): a real English text
    every notebook can score the model on, offline."""
    return resources.files("llama_lite").joinpath("data/declaration.txt").read_text(encoding="utf-8").strip()


def _next_token_logits(model, tokens: Sequence[int], stepwise: bool) -> torch.Tensor:
    """Logits after each prefix of tokens, (len(tokens) - 1, vocab), float32 (Transformer.forward
    returns float logits): in one forward, or one token per forward through a KV cache, as
    decoding runs."""
    if len(tokens) < 2:
        raise ValueError("scoring a text needs at least two tokens")
    if len(tokens) > model.params.max_seq_len:
        raise ValueError(f"{len(tokens)} tokens exceed the model's context (max_seq_len={model.params.max_seq_len}); "
                         "score a shorter slice")
    x = torch.tensor([list(tokens)], device=model.tok_embeddings.weight.device)
    if not stepwise:
        return model(x[:, :-1])[0]
    from .generation import model_lock  # the cache is the model's: not while a generate runs

    with model_lock(model):
        model.setup_cache(1, x.shape[1])
        try:
            return torch.cat([model(x[:, i:i + 1], i) for i in range(x.shape[1] - 1)], dim=1)[0]
        finally:
            model.clear_cache()


@torch.inference_mode()
def perplexity(model, tokens: Sequence[int], stepwise: bool = False) -> float:
    """exp(mean negative log-likelihood) of tokens[1:] given their prefixes: in one forward, or
    with stepwise=True one token per forward through a KV cache, as decoding runs. In float the
    two agree to rounding. With int8 activations (W8A8) they differ more: the cached and the
    uncached forward differ in the last bits, one activation then rounds to the neighbouring
    integer, and that step grows through the layers; the two are two draws of the rounding
    noise, and their spread is how precisely int8's cost is known."""
    logits = _next_token_logits(model, tokens, stepwise)
    targets = torch.tensor(list(tokens)[1:], device=logits.device)
    return float(torch.exp(F.cross_entropy(logits, targets)))


@torch.inference_mode()
def greedy_lead(model, prompt: Sequence[int], generated: Sequence[int]) -> float:
    """The smallest lead, in logits, of each generated token over the best other token, from one
    forward over prompt + generated. Greedy decoding picks the largest logit, so for its tokens
    this is >= 0; another CPU or torch rounds the logits differently, by ~1e-4 in float32, and
    where a lead is that small the text can change from there on. A notebook prints a generation
    as a stable output only if its lead is far above that; a negative lead means some token was
    not the model's first choice (a sampled text, or logits that changed)."""
    if len(prompt) < 1 or len(generated) < 1:
        raise ValueError("greedy_lead needs a prompt and at least one generated token")
    tokens = list(prompt) + list(generated)
    logits = _next_token_logits(model, tokens, stepwise=False)[len(prompt) - 1:].float()  # (len(generated), vocab)
    chosen = torch.tensor(list(generated), device=logits.device)[:, None]
    won = logits.gather(1, chosen)[:, 0]
    logits.scatter_(1, chosen, float("-inf"))  # the best token other than the chosen one
    return float((won - logits.max(-1).values).min())


@torch.inference_mode()
def log_probs(model, tokens: Sequence[int], stepwise: bool = False) -> torch.Tensor:
    """log p(next token | prefix) over the whole vocabulary after each prefix of tokens, float32,
    (len(tokens) - 1, vocab): what `compare` measures two models by. stepwise as in perplexity."""
    return torch.log_softmax(_next_token_logits(model, tokens, stepwise), dim=-1)


def compare(reference: torch.Tensor, other: torch.Tensor, tokens: Sequence[int]) -> dict:
    """How far one model's next-token distributions (`other`, from log_probs) are from a
    reference's on the same tokens:
    kl: mean KL(reference || other) in nats per token, the distance llama.cpp reports for its
        quantizations (it counts every token's whole distribution, not just the right token's
        probability, so a short text measures it well);
    top1: how often the two models' most likely next tokens agree;
    ppl_ratio: other's perplexity over the reference's, with `ppl_interval`, its 95% range from
        the per-token log-likelihood differences (mean +- 2 standard errors, tokens taken as
        independent): on a few hundred tokens a change of a few percent is within it."""
    if reference.shape != other.shape or reference.shape[0] != len(tokens) - 1:
        raise ValueError(f"compare takes two log_probs of the same {len(tokens)} tokens, ({len(tokens) - 1}, vocab) "
                         f"each; got {tuple(reference.shape)} and {tuple(other.shape)}")
    targets = torch.tensor(list(tokens)[1:], device=reference.device)[:, None]
    kl = (reference.exp() * (reference - other)).sum(-1)  # (n-1,)
    diff = (reference.gather(1, targets) - other.gather(1, targets))[:, 0]  # other's extra nll per token
    spread = 2 * diff.std() / diff.numel() ** 0.5 if diff.numel() > 1 else float("inf")  # one token: no range
    return {"kl": float(kl.mean()), "top1": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
            "ppl_ratio": float(diff.mean().exp()),
            "ppl_interval": (float((diff.mean() - spread).exp()), float((diff.mean() + spread).exp()))}
