"""CPU decode benchmark (issue 12): SmolLM2-135M, batch 1, greedy, from a fixed prompt.

Runs, interleaved in one process and reporting the median of the repeats:
  llama_lite eager with KV cache (Llama.generate), llama_lite's fast path (llama_lite.fast)
  eager and compiled (frozen weights, inductor's C++ GEMMs; compiling takes minutes, once),
  transformers' generate on the same GGUF weights, llama_lite int8 (weight-only) and, with
  --bf16, bfloat16; llama_lite without KV cache once (it is quadratic).
Prints tok/s, the ratio to transformers, the fraction of two memory-bandwidth rooflines
(bytes of weights read per token / measured bandwidth: of a copy, reads + writes counted,
and of a read-only sum), the quality cost of int8/bf16 (perplexity on
llama_lite.evaluate.sample_text, greedy agreement with fp32), and the time from GGUF file to
ready model.

    python benchmarks/decode_cpu.py              # 256 new tokens, 3 repeats
    python benchmarks/decode_cpu.py --quick      # 32 new tokens, 1 repeat
    python benchmarks/decode_cpu.py --no-compile # skip the compiled fast path
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llama_lite.timing import copy_bandwidth, read_bandwidth

PROMPT = "The history of the printing press"


def load_seconds(repeats: int) -> dict:
    """GGUF file -> ready model, the parsed-file cache cleared each time. The first build in a
    process also pays one-time imports (gguf, the tokenizer's modules) and lazy initialisation;
    it is reported apart from the median of the next `repeats`."""
    from llama_lite import Llama
    from llama_lite.gguf import clear_gguf_cache, gguf_model_args, open_gguf, smollm2_gguf_path

    t = time.perf_counter()
    Llama.build()
    first = time.perf_counter() - t
    path, parse, total = smollm2_gguf_path(), [], []
    for _ in range(repeats):
        clear_gguf_cache()
        t = time.perf_counter()
        gguf_model_args(open_gguf(path))
        parse.append(time.perf_counter() - t)
        clear_gguf_cache()
        t = time.perf_counter()
        Llama.build()
        total.append(time.perf_counter() - t)
    return {"first": first, "parse": statistics.median(parse), "total": statistics.median(total)}


def agreement(a, b) -> float:
    """Fraction of greedy tokens equal position by position (over the shorter list)."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / max(n, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 tokens, 1 repeat, uncached over 16 tokens")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also bf16 (pays only with bf16 matrix units)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled fast path (minutes to compile)")
    args = ap.parse_args(argv)
    n_new = args.tokens or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    from llama_lite import Llama
    from llama_lite.gguf import smollm2_gguf_path
    from llama_lite.evaluate import perplexity, sample_text
    from llama_lite.fast import FastDecoder, greedy_generate
    from llama_lite.quantize import model_bytes

    loads = load_seconds(1 if args.quick else 3)
    bw = copy_bandwidth(1 << 28)  # bytes read + written per second of a 256 MiB copy_ into a preallocated tensor
    read_bw = read_bandwidth(1 << 28)  # bytes read per second of a 256 MiB sum
    fp32 = Llama.build()
    tok = fp32.tokenizer
    prompt = tok.encode(PROMPT, bos=tok.add_bos, eos=False)
    no_stop = ()  # the benchmark always produces n_new tokens

    def eager_run(llama, cached=True, n=n_new):
        # Llama.generate stops at EOS; so that every method decodes the same n tokens the
        # tokenizer's stop list is emptied for the call.
        saved, llama.tokenizer.stop_ids = llama.tokenizer.stop_ids, []
        try:
            return llama.generate([prompt], n, temperature=0, use_cache=cached)[0][0]
        finally:
            llama.tokenizer.stop_ids = saved

    fast_decoder = FastDecoder(fp32.model, 1, len(prompt) + n_new)

    def fast_run(llama=fp32, decoder=fast_decoder):
        return greedy_generate(llama.model, prompt, n_new, no_stop, decoder=decoder)

    methods = {"llama_lite cached": lambda: eager_run(fp32), "llama_lite fast path": fast_run}
    compile_s = None
    if not args.no_compile:
        compiled_decoder = FastDecoder(fp32.model, 1, len(prompt) + n_new, compile=True)
        t = time.perf_counter()
        fast_run(decoder=compiled_decoder)  # the first call compiles
        compile_s = time.perf_counter() - t
        methods["llama_lite fast, compiled"] = lambda: fast_run(decoder=compiled_decoder)
    int8 = Llama.build(quantize="int8")
    methods["llama_lite int8 cached"] = lambda: eager_run(int8)
    if args.bf16:
        bf16 = Llama.build(dtype=torch.bfloat16)
        methods["llama_lite bf16 cached"] = lambda: eager_run(bf16)
    if not args.no_hf:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        gguf = smollm2_gguf_path()
        folder = Path(tempfile.mkdtemp())
        (folder / gguf.name).symlink_to(gguf)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])

        def hf_run():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                                  min_new_tokens=n_new, pad_token_id=tok.eos_id)
            return out[0, len(prompt):].tolist()

        methods["transformers generate"] = hf_run

    for run in methods.values():  # warm-up: first-call allocations, lazy inits
        run()
    times = {k: [] for k in methods}
    outputs = {}
    for _ in range(repeats):
        for name, run in methods.items():
            t = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t)
    n_uncached = 16 if args.quick else n_new
    t = time.perf_counter()
    uncached = eager_run(fp32, cached=False, n=n_uncached)
    uncached_s = time.perf_counter() - t

    tps = {k: n_new / statistics.median(v) for k, v in times.items()}
    weights = model_bytes(fp32.model)
    roofline, read_roofline = bw / weights, read_bw / weights
    ref = tps.get("transformers generate")
    print(f"SmolLM2-135M, batch 1, greedy, prompt {len(prompt)} tokens, {n_new} new tokens, "
          f"{args.threads} threads, median of {repeats} interleaved repeat(s)")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), read bandwidth {read_bw / 1e9:.1f} GB/s; fp32 weights "
          f"{weights / 1e6:.0f} MB read per token -> roofline {roofline:.1f} tok/s (copy), {read_roofline:.1f} (read)")
    print(f"{'method':28s} {'tok/s':>8s} {'x transformers':>15s} {'of copy roofline':>17s} {'of read roofline':>17s}")
    for name, v in tps.items():
        b = weights if "int8" not in name and "bf16" not in name else model_bytes(
            (int8 if "int8" in name else bf16).model)
        print(f"{name:28s} {v:8.2f} {v / ref if ref else float('nan'):15.2f} {v / (bw / b):17.0%} "
              f"{v / (read_bw / b):17.0%}")
    un_tps = n_uncached / uncached_s
    print(f"{'llama_lite uncached':28s} {un_tps:8.2f} {un_tps / ref if ref else float('nan'):15.2f}"
          f"   ({n_uncached} tokens, once; cached / uncached = {tps['llama_lite cached'] / un_tps:.1f}x)")
    base = outputs["llama_lite cached"]
    print(f"greedy tokens identical: cached vs uncached ({n_uncached}): {base[:n_uncached] == uncached}; "
          f"fast vs eager: {outputs['llama_lite fast path'] == base}"
          + (f"; compiled vs eager: {outputs['llama_lite fast, compiled'] == base}" if compile_s else "")
          + (f"; transformers vs llama_lite: {agreement(outputs['transformers generate'], base):.0%} agree"
             if ref else ""))

    text = tok.encode(sample_text(), bos=tok.add_bos, eos=False)[:512]
    ppl = perplexity(fp32.model, text)
    print(f"quality on sample_text ({len(text)} tokens): fp32 perplexity {ppl:.3f}")
    for name, other in [("int8", int8)] + ([("bf16", bf16)] if args.bf16 else []):
        print(f"  {name}: weights {model_bytes(other.model) / 1e6:.0f} MB, perplexity "
              f"{perplexity(other.model, text):.3f}, greedy agreement with fp32 "
              f"{agreement(outputs[f'llama_lite {name} cached'], base):.0%}")
    if compile_s:
        print(f"compiled fast path: first call (compiling, {n_new} tokens) {compile_s:.0f} s")
    print(f"GGUF -> ready model: {loads['total']:.2f} s (of which parsing the GGUF {loads['parse']:.2f} s); "
          f"the process's first load, with one-time imports: {loads['first']:.2f} s")


if __name__ == "__main__":
    main()
