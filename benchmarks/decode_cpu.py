"""CPU decode benchmark: SmolLM2-135M, batch 1, greedy, from a fixed prompt.

Runs, interleaved in one process and reporting the median of the repeats:
  llama_lite with KV cache (Llama.generate: the CLI's and the notebooks' path; its float32
  weights held transposed, llama_lite.matvec), the same weights in nn.Linear's own (out, in)
  layout (PyTorch's matrix-vector kernel; both layouts also with 4 rows at once and for a
  256-token prompt), the same model with its blocks compiled (llama_lite.fast; the first call
  compiles, or loads inductor's on-disk cache), transformers' generate on the same GGUF weights, llama_lite int8
  (weight-only), llama_lite W8A8 (int8 weights and activations, where the CPU's int8 kernel is
  exact), bfloat16 (by default only where the CPU has bf16 instructions; --bf16 forces it),
  llama.cpp on the GGUF file's own quantized weights when llama-cpp-python is installed
  (the fastest CPU engine, as a peer); llama_lite without KV cache once (it is quadratic).
Prints the CPU (vector ISA, bf16/AMX/VNNI flags) first.
Prints tok/s, the ratio to transformers, the fraction of two memory-bandwidth rooflines
(bytes of weights read per token / measured bandwidth: of a copy, reads + writes counted,
and of a read-only sum), the quality cost of int8/W8A8/bf16 on llama_lite.evaluate.sample_text
(KL divergence from fp32's next-token distributions, top-1 agreement, the perplexity ratio with
its 95% range: llama_lite.evaluate.compare; and greedy tokens shared with fp32), W8A8's cost
one projection at a time, without smoothing, with only W_2's input rotated (also timed), without
W_2's rotation, with nothing rotated and with W_2 in float16 instead (also timed), and the time
from GGUF file to ready model.

    python benchmarks/decode_cpu.py              # 256 new tokens, 3 repeats
    python benchmarks/decode_cpu.py --quick      # 32 new tokens, 1 repeat
    python benchmarks/decode_cpu.py --no-compile # skip the compiled model
"""
import argparse
import copy
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


def decode_bytes(model) -> int:
    """Bytes of weights one decode step reads: every projection (a tied output counts the
    embedding table once) and the norms' gains; of the embedding table only one row, nothing.
    A W8A8Linear reads FBGEMM's packed int8 copy (its plain int8 one serves prompts only), an
    F16Linear FBGEMM's packed float16 copy."""
    from torch import nn

    from llama_lite.norm import RMSNorm
    from llama_lite.quantize import F16Linear, Int8Linear, W8A8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, (W8A8Linear, F16Linear)):
            total += m.nbytes
        elif isinstance(m, (Int8Linear, nn.Linear, RMSNorm)):
            total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return total


def prompt_seconds(model, n: int = 256, repeats: int = 3) -> float:
    """Median seconds of one uncached forward over an n-token prompt (random ids)."""
    tokens = torch.randint(0, model.params.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    model.clear_cache()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up
            t = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def plain_layout(model):
    """A second Transformer with the same weights (copies) in nn.Linear's own layout, W (out, in)
    row-major, and plain nn.Linear modules: what llama_lite.matvec's transposed weights are
    measured against."""
    from llama_lite.checkpoint import empty_model

    twin = empty_model(model.params)
    twin.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, assign=True)
    if model.params.tie_embeddings:
        twin.output.weight = twin.tok_embeddings.weight
    twin.freqs_cis = model.freqs_cis
    return twin.eval().requires_grad_(False)


def linears_alone(model, repeats: int = 5, rows: int = 1) -> tuple[int, float]:
    """(number of linear layers, seconds) for one pass of `rows` tokens' activations through
    every nn.Linear of the model in order, nothing else: the float32 products as the model calls
    them, so (one row) the fastest a float32 decode step could be with every other op free."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = {m.in_features: torch.randn(rows, 1, m.in_features) for m in linears}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up
            t = time.perf_counter()
            for m in linears:
                m(inputs[m.in_features])
            times.append(time.perf_counter() - t)
    return len(linears), statistics.median(times[1:])


def first_difference(a, b) -> int:
    """How many greedy tokens two runs share before they part (after the first difference the
    two continuations no longer answer the same context, so position-by-position agreement
    says little)."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def top_two_at(llama, prompt, tokens, k) -> str:
    """Float32's two most likely next tokens after prompt + tokens[:k], and their logits: how
    near a tie the first difference of a quantized run was."""
    with torch.inference_mode():
        logits = llama.model(torch.tensor([prompt + tokens[:k]]))[0, -1]
    top = logits.topk(2)
    a, b = (llama.tokenizer.decode([int(i)]) for i in top.indices)
    return f"float32's top two there: {a!r} {top.values[0]:.2f}, {b!r} {top.values[1]:.2f}"


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
    ap.add_argument("--bf16", action="store_true", help="bf16 even if the CPU lacks bf16 instructions")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled model")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if llama-cpp-python is installed")
    args = ap.parse_args(argv)
    n_new = args.tokens or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    from llama_lite import Llama
    from llama_lite.evaluate import compare, log_probs, perplexity, sample_text
    from llama_lite.fast import compiled_copy
    from llama_lite.gguf import smollm2_gguf_path
    from llama_lite.quantize import PROJECTIONS, W8A8_ROTATE, quantize_model_w8a8, w8a8_available, w8a8_only
    from llama_lite.timing import cpu_description, has_native_bf16

    print(cpu_description())

    loads = load_seconds(1 if args.quick else 3)
    bw = copy_bandwidth(1 << 28)  # bytes read + written per second of a 256 MiB copy_ into a preallocated tensor
    read_bw = read_bandwidth(1 << 28)  # bytes read per second of a 256 MiB sum
    fp32 = Llama.build()
    tok = fp32.tokenizer
    prompt = tok.encode(PROMPT, bos=tok.add_bos, eos=False)

    def eager_run(llama, cached=True, n=n_new):
        # Llama.generate stops at EOS; so that every method decodes the same n tokens the
        # tokenizer's stop list is emptied for the call.
        saved, llama.tokenizer.stop_ids = llama.tokenizer.stop_ids, []
        try:
            return llama.generate([prompt], n, temperature=0, use_cache=cached)[0][0]
        finally:
            llama.tokenizer.stop_ids = saved

    plain = Llama(plain_layout(fp32.model), tok)
    methods = {"llama_lite cached": lambda: eager_run(fp32), "llama_lite, W (out, in)": lambda: eager_run(plain)}
    compile_s = None
    if not args.no_compile:
        compiled = Llama(compiled_copy(fp32.model), fp32.tokenizer)
        t = time.perf_counter()
        eager_run(compiled)  # the first call compiles (or loads inductor's on-disk cache)
        compile_s = time.perf_counter() - t
        methods["llama_lite compiled"] = lambda: eager_run(compiled)
    int8 = Llama.build(quantize="int8")
    methods["llama_lite int8 cached"] = lambda: eager_run(int8)
    w8a8 = w8a8_f16 = w8a8_w2 = None
    ok, why = w8a8_available()
    if ok:
        w8a8 = Llama.build(quantize="w8a8")
        methods["llama_lite w8a8 cached"] = lambda: eager_run(w8a8)
        # what rotating the shared inputs (W_Q, W_K, W_V; W_1, W_3) costs in speed: only W_2's rotated
        w8a8_w2 = Llama(quantize_model_w8a8(Llama.build().model, rotate=("feed_forward.w2",)), fp32.tokenizer)
        methods["llama_lite w8a8, W_2 rot only"] = lambda: eager_run(w8a8_w2)
        # the alternative to rotating W_2: keeping it out of int8, its weights float16
        w8a8_f16 = Llama(quantize_model_w8a8(Llama.build().model, keep_float=("feed_forward.w2",)), fp32.tokenizer)
        methods["llama_lite w8a8, W_2 float16"] = lambda: eager_run(w8a8_f16)
    else:
        print(f"w8a8 row skipped: {why}")
    bf16 = None
    if args.bf16 or has_native_bf16():
        bf16 = Llama.build(dtype=torch.bfloat16)
        methods["llama_lite bf16 cached"] = lambda: eager_run(bf16)
    if not args.no_llama_cpp:
        try:
            import llama_cpp
        except ImportError:
            print("llama.cpp row skipped: pip install llama-cpp-python to add it")
        else:
            gguf = smollm2_gguf_path()
            cpp = llama_cpp.Llama(str(gguf), n_ctx=len(prompt) + n_new + 8, n_threads=args.threads,
                                  n_batch=512, verbose=False)

            def cpp_run():
                out = []
                for t in cpp.generate(prompt, temp=0.0, top_k=1, reset=True):
                    out.append(t)
                    if len(out) == n_new:
                        break
                return out

            methods[f"llama.cpp ({gguf.name.split('.')[-2] if gguf.name.count('.') > 1 else 'GGUF'})"] = cpp_run
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
    n_uncached = min(16, n_new) if args.quick else n_new
    t = time.perf_counter()
    uncached = eager_run(fp32, cached=False, n=n_uncached)
    uncached_s = time.perf_counter() - t

    tps = {k: n_new / statistics.median(v) for k, v in times.items()}
    models = {"llama_lite cached": fp32, "llama_lite, W (out, in)": plain,
              "llama_lite compiled": fp32, "llama_lite int8 cached": int8,
              "llama_lite w8a8 cached": w8a8, "llama_lite w8a8, W_2 float16": w8a8_f16,
              "llama_lite w8a8, W_2 rot only": w8a8_w2,
              "llama_lite bf16 cached": bf16, "transformers generate": fp32}  # whose weights each row reads
    weights = decode_bytes(fp32.model)
    roofline, read_roofline = bw / weights, read_bw / weights
    ref = tps.get("transformers generate")
    print(f"SmolLM2-135M, batch 1, greedy, prompt {len(prompt)} tokens, {n_new} new tokens, "
          f"{args.threads} threads, median of {repeats} interleaved repeat(s)")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), read bandwidth {read_bw / 1e9:.1f} GB/s; fp32 weights "
          f"{weights / 1e6:.0f} MB read per token -> roofline {roofline:.1f} tok/s (copy), {read_roofline:.1f} (read)")
    print(f"{'method':30s} {'tok/s':>8s} {'x transformers':>15s} {'of copy roofline':>17s} {'of read roofline':>17s}")
    for name, v in tps.items():
        if name.startswith("llama.cpp"):
            b = smollm2_gguf_path().stat().st_size  # its quantized weights, as stored in the file
        else:
            b = decode_bytes(models[name].model)
        print(f"{name:30s} {v:8.2f} {v / ref if ref else float('nan'):15.2f} {v / (bw / b):17.0%} "
              f"{v / (read_bw / b):17.0%}")
    for name, model in (("(float32 linears alone)", fp32.model), ("(the same, W (out, in))", plain.model)):
        n_linear, linear_s = linears_alone(model)
        print(f"{name:30s} {1 / linear_s:8.2f} {1 / linear_s / ref if ref else float('nan'):15.2f}"
              f"   (the {n_linear} nn.Linear of one decode step, nothing else: {linear_s * 1e3:.1f} ms per token, "
              f"{weights / linear_s / 1e9:.1f} GB/s)")
    four = [linears_alone(m, rows=4)[1] for m in (fp32.model, plain.model)]
    print(f"  4 rows at once (a batch, or 4 beams) through the same layers: W^T {four[0] * 1e3:.1f} ms, "
          f"W (out, in) {four[1] * 1e3:.1f} ms ({four[0] / four[1]:.2f}x the time)")
    n_prompt = 16 if args.quick else 256
    prompt_s = [prompt_seconds(m, n_prompt) for m in (fp32.model, plain.model)]
    print(f"  a {n_prompt}-token prompt, one forward: W^T {prompt_s[0] * 1e3:.0f} ms, W (out, in) {prompt_s[1] * 1e3:.0f} ms "
          f"({prompt_s[0] / prompt_s[1]:.2f}x the time)")
    un_tps = n_uncached / uncached_s
    print(f"{'llama_lite uncached':30s} {un_tps:8.2f} {un_tps / ref if ref else float('nan'):15.2f}"
          f"   ({n_uncached} tokens, once; cached / uncached = {tps['llama_lite cached'] / un_tps:.1f}x)")
    base = outputs["llama_lite cached"]
    same = [f"cached vs uncached ({n_uncached}): {base[:n_uncached] == uncached}"]
    same.append(f"W^T vs W (out, in): {outputs['llama_lite, W (out, in)'] == base}")
    if compile_s:
        same.append(f"compiled vs eager: {outputs['llama_lite compiled'] == base}")
    if ref:
        same.append(f"transformers vs llama_lite: {agreement(outputs['transformers generate'], base):.0%} agree")
    print("greedy tokens identical: " + "; ".join(same))

    text = tok.encode(sample_text(), bos=tok.add_bos, eos=False)[:512]
    reference = log_probs(fp32.model, text)
    print(f"quality on sample_text ({len(text)} tokens) against fp32 (perplexity {perplexity(fp32.model, text):.3f}):"
          " KL = mean KL divergence from fp32's next-token distribution (nats per token), top-1 = fp32's most"
          " likely next token kept, perplexity ratio (95% range from the per-token differences)")

    def quality(model, stepwise=False) -> str:
        c = compare(reference, log_probs(model, text, stepwise), text)
        lo, hi = c["ppl_interval"]
        return f"KL {c['kl']:.4f}, top-1 {c['top1']:.1%}, perplexity x{c['ppl_ratio']:.3f} ({lo:.3f}-{hi:.3f})"

    others = [("int8", int8)] + ([("w8a8", w8a8)] if w8a8 else []) + ([("bf16", bf16)] if bf16 else [])
    for name, other in others:
        k = first_difference(outputs[f"llama_lite {name} cached"], base)
        print(f"  {name}: {decode_bytes(other.model) / 1e6:.0f} MB read per token; {quality(other.model)}")
        if name == "w8a8":  # its rounding noise differs between one forward and token by token: both are scored
            print(f"    token by token, as decoded: {quality(other.model, stepwise=True)}")
        print(f"    greedy tokens equal to fp32's: the first {k} of {len(base)}")
        if k < len(base):
            print(f"    ({top_two_at(fp32, prompt, base, k)})")
    if w8a8:
        print("  W8A8, one projection at a time in int8, smoothed and rotated as in the w8a8 row (the others "
              "float32):")
        for proj in PROJECTIONS:
            print(f"    {proj:16s} {quality(w8a8_only(copy.deepcopy(fp32.model), (proj,)))}")
        print(f"    {'W_2 not rotated':16s} {quality(w8a8_only(copy.deepcopy(fp32.model), ('feed_forward.w2',), rotate=()))}")
        unsmoothed = quantize_model_w8a8(copy.deepcopy(fp32.model), smooth=False)
        print(f"  W8A8 without smoothing: {quality(unsmoothed)}")
        others_rotated = tuple(n for n in W8A8_ROTATE if n != "feed_forward.w2")
        print(f"  W8A8 with only W_2 rotated (the w8a8, W_2 rot only row): {quality(w8a8_w2.model)}")
        not_w2 = quantize_model_w8a8(copy.deepcopy(fp32.model), rotate=others_rotated)
        print(f"  W8A8 with W_2 not rotated (the others rotated): {quality(not_w2)}")
        print(f"  W8A8 with nothing rotated: {quality(quantize_model_w8a8(copy.deepcopy(fp32.model), rotate=()))}")
        print(f"  W8A8 with W_2 in float16 instead (the w8a8, W_2 float16 row): {quality(w8a8_f16.model)}")
    for name in outputs:
        if name.startswith("llama.cpp"):
            print(f"{name}: greedy tokens equal to llama_lite fp32's: the first {first_difference(outputs[name], base)} "
                  f"of {len(base)} "
                  "(its own quantized weights and kernels)")
    if compile_s:
        print(f"compiled model: first call ({n_new} tokens, compiling or loading inductor's cache) {compile_s:.0f} s")
    print(f"GGUF -> ready model: {loads['total']:.2f} s (of which parsing the GGUF {loads['parse']:.2f} s); "
          f"the process's first load, with one-time imports: {loads['first']:.2f} s")


if __name__ == "__main__":
    main()
