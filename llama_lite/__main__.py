"""Command line: python -m llama_lite generate "..." | chat "...".

With no --checkpoint it runs the embedded SmolLM2-135M-Instruct on the CPU, offline.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr and exit status 2 (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e)).strip()


def _check_before_loading(args) -> None:
    """Everything that can be checked without the model, so a mistake costs milliseconds, not a
    load: the prompt, the sampling and beam settings, the sizes, the seed, the paths."""
    from pathlib import Path

    from .checkpoint import check_overrides, detect_format
    from .generation import check_sampling, check_seed

    if not args.prompt:
        raise ValueError("empty prompt: give some text to continue" if args.command == "generate" else
                         "empty message: give the user's message to answer")
    check_sampling(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    if args.num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1 (1 is greedy), got {args.num_beams}")
    check_overrides(max_seq_len=args.max_seq_len)
    check_seed(args.seed)
    if args.checkpoint is not None:
        if not args.checkpoint.strip():
            raise ValueError("--checkpoint is empty; give a checkpoint path, or leave it out for the embedded model")
        detect_format(Path(args.checkpoint))  # not found, or a file where a folder is meant
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file {args.tokenizer} not found; --tokenizer takes the path of a "
                                "tokenizer.model (or .gguf) file")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llama_lite", description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("generate", "continue a text"), ("chat", "answer a message through the chat format")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("prompt", help="the text to continue" if name == "generate" else "the user's message")
        s.add_argument("--checkpoint", default=None,
                       help="Meta folder (params.json + consolidated.*.pth), Hugging Face folder (config.json + "
                            "*.safetensors) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
        s.add_argument("--tokenizer", default=None, help="tokenizer.model path, if not beside the checkpoint")
        s.add_argument("--max-new-tokens", type=int, default=64 if name == "generate" else 256)
        s.add_argument("--temperature", type=float, default=0.0,
                       help="0 is greedy (the default, reproducible), else >= 0.001; Meta's examples use 0.6")
        s.add_argument("--top-p", type=float, default=0.9)
        s.add_argument("--top-k", type=int, default=None)
        s.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (greedy if 1)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps; default: cuda for a checkpoint if present")
        s.add_argument("--dtype", default=None, help="float32, bfloat16 or float16; default: bfloat16 on a GPU that has it (A100, L4, H100), "
                            "float16 on older ones (T4, V100), float32 on a CPU")
        s.add_argument("--max-seq-len", type=int, default=None)
        s.add_argument("--quantize", choices=["int8", "w8a8"], default=None,
                       help="int8: int8 weights (half of bf16's memory: a 7B on a 16 GB GPU); "
                            "w8a8: int8 weights and activations on an x86 CPU with AVX512-VNNI (1.9x float32's decode "
                            "speed on the machine in README's Benchmarks)")
        s.add_argument("--compile", action="store_true",
                       help="torch.compile the model's blocks: the first run waits for the compiler (tens of "
                            "seconds on a CPU), later runs reuse its on-disk cache")
        s.add_argument("--stats", action="store_true", help="print load time and tokens/s to stderr")
        if name == "chat":
            s.add_argument("--system", default=None, help="a system prompt")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from .checkpoint import check_quantize
    from .devices import CheckpointError, resolve_device, resolve_dtype
    from .generation import Llama

    # Under torchrun (WORLD_SIZE > 1) the model is split over the processes (notebook 08); rank 0 prints.
    tp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if tp:
        from .parallel import build_llama, is_rank0
    build = build_llama if tp else Llama.build
    try:
        _check_before_loading(args)
        if args.device is not None or args.dtype is not None or args.quantize:  # checked before anything is loaded
            device = resolve_device(args.device or ("cpu" if args.checkpoint is None else None))
            check_quantize(args.quantize, device, resolve_dtype(args.dtype, device))
        if args.compile and tp:
            raise ValueError("--compile is for one process; under torchrun the sharded model runs eagerly")
        extra = dict(compile=True) if args.compile else {}
        llama = build(args.checkpoint, args.tokenizer, max_seq_len=args.max_seq_len, device=args.device,
                      dtype=args.dtype, seed=args.seed, progress=args.checkpoint is not None, quantize=args.quantize,
                      **extra)
        tok = llama.tokenizer
        if args.command == "generate":
            if not args.prompt:
                raise ValueError("empty prompt: give some text to continue")
            prompt = tok.encode(args.prompt, bos=tok.add_bos, eos=False)
        else:
            dialog = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            prompt = tok.encode_dialog(dialog)
        start = time.perf_counter()
        if args.num_beams != 1:  # beam_search checks num_beams (and says so if it is < 1)
            out, _score = llama.beam_search(prompt, args.num_beams, args.max_new_tokens)
        else:
            torch.manual_seed(args.seed)
            (out,), _ = llama.generate([prompt], args.max_new_tokens, args.temperature, args.top_p, args.top_k)
        elapsed = time.perf_counter() - start
    except (ValueError, TypeError, OSError, CheckpointError) as e:
        if not tp or is_rank0():
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if tp and not is_rank0():
        return 0
    text = tok.decode(out)
    print(text if args.command == "generate" else text.strip())
    if args.stats:
        print(f"[load {llama.load_seconds:.2f} s, {len(prompt)} prompt tokens, {len(out)} new tokens in "
              f"{elapsed:.2f} s: {len(out) / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .parallel import exit_rank

        exit_rank(code)  # one rank of torchrun's: leave without finalization (see exit_rank)
    sys.exit(code)
