"""Llama-2-7B at its true size on a CPU: load time, peak RAM, tokens, and the logits against transformers.

    python benchmarks/load_7b_cpu.py                 # 7B: ~27 GB of disk, ~15 GB of RAM, ~15 min on 2 cores
    python benchmarks/load_7b_cpu.py --layers 2      # 7B-wide, 2 layers: a quick check of the script

Writes a Llama-2-7B-shaped checkpoint with random bf16 weights in Meta's exact layout (params.json
as Meta ships it, one consolidated.00.pth) and in Hugging Face's (config.json, sharded safetensors,
index), each with the real Llama-2 tokenizer.model (../shared/data/ beside the checkout). Then, each
in a fresh process and one after the other (two 13.5 GB models do not fit in 24 GiB together):
  - llama_lite `Llama.build(folder, device="cpu", dtype="bfloat16")` on the Meta folder, then on the
    HF folder: load seconds, peak RSS (VmHWM) against the checkpoint's size, the next-token logits of
    a prompt and a few greedy tokens;
  - transformers `LlamaForCausalLM.from_pretrained(hf_folder, dtype=bfloat16)`: the same logits and
    greedy tokens.
Prints the largest logit difference of each llama_lite load against transformers (both bf16, so the
difference is bf16 rounding in a different order of operations), Meta-vs-HF equality, and where
the greedy tokens part. Not part of CI (27 GB of disk).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The capital of France is"

HWM = """
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

LITE = HWM + r"""
import json, sys, time, torch
from llama_lite import Llama
torch.set_num_threads(int(sys.argv[4]))
baseline = peak_rss()
start = time.perf_counter()
llama = Llama.build(sys.argv[1], device="cpu", dtype="bfloat16", max_seq_len=64)
load_s = time.perf_counter() - start
peak_load = peak_rss()
prompt = llama.tokenizer.encode(sys.argv[3], bos=True, eos=False)
with torch.inference_mode():
    logits = llama.model(torch.tensor([prompt]), 0)[0, -1].float()
start = time.perf_counter()
(tokens,), _ = llama.generate([prompt], int(sys.argv[5]), temperature=0)
gen_s = time.perf_counter() - start
torch.save({"logits": logits, "tokens": tokens, "prompt": prompt}, sys.argv[2])
print(json.dumps(dict(load_s=load_s, baseline=baseline, peak_load=peak_load, peak=peak_rss(), gen_s=gen_s, n=len(tokens),
                      dtype=str(llama.model.tok_embeddings.weight.dtype))))
"""

HF = HWM + r"""
import json, sys, time, torch
from transformers import LlamaForCausalLM
torch.set_num_threads(int(sys.argv[4]))
prompt = torch.load(sys.argv[3])["prompt"]
start = time.perf_counter()
model = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
load_s = time.perf_counter() - start
ids = torch.tensor([prompt])
with torch.inference_mode():
    logits = model(ids).logits[0, -1].float()
    out = model.generate(ids, max_new_tokens=int(sys.argv[5]), do_sample=False, eos_token_id=2, pad_token_id=0)
tokens = out[0, len(prompt):].tolist()
torch.save({"logits": logits, "tokens": tokens}, sys.argv[2])
print(json.dumps(dict(load_s=load_s, peak=peak_rss())))
"""


def run(code_or_args, *argv) -> dict:
    cmd = [sys.executable, "-c", code_or_args, *map(str, argv)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"subprocess failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def write(fmt: str, layers: int, folder: Path, tokenizer: Path) -> float:
    """Write one format in a fresh process (so this process never holds the weights)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[4]); import synthetic as s; "
            "from llama_lite import ModelArgs; from pathlib import Path; t = time.perf_counter(); "
            "args = ModelArgs.from_name('llama2-7b').replace(n_layers=int(sys.argv[2])); "
            "getattr(s, 'write_' + sys.argv[1])(args, Path(sys.argv[3]), Path(sys.argv[5])); "
            "import json; print(json.dumps(dict(s=time.perf_counter() - t)))")
    return run(code, fmt, layers, folder, Path(__file__).parent, tokenizer)["s"]


def main(argv=None) -> int:
    from synthetic import TOKENIZER, checkpoint_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="transformer layers (Llama-2-7B has 32)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to generate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--no-hf-reference", action="store_true", help="skip transformers")
    a = p.parse_args(argv)
    root = a.dir or Path(tempfile.mkdtemp(prefix="llama7b-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"Llama-2-7B shape, {a.layers} of 32 layers, random bf16 weights; torch {torch.__version__}, "
          f"{a.threads} threads; writing to {root}")
    results, outs = {}, {}
    try:
        for fmt in ("meta", "hf"):
            folder = root / fmt
            secs = write(fmt, a.layers, folder, a.tokenizer)
            size = checkpoint_bytes(folder)
            outs[fmt] = root / f"{fmt}_lite.pt"
            r = run(LITE, folder, outs[fmt], PROMPT, a.threads, a.tokens)
            r.update(size=size, write_s=secs)
            results[fmt] = r
            print(f"{fmt:4s}: wrote {size / 1e9:.2f} GB in {secs:.0f} s; llama_lite load {r['load_s']:.1f} s "
                  f"({r['dtype']}), peak RSS after load {r['peak_load'] / 1e9:.2f} GB = {r['peak_load'] / size:.2f}x "
                  f"the checkpoint ({(r['peak_load'] - r['baseline']) / size:.2f}x above the "
                  f"{r['baseline'] / 1e9:.2f} GB of the process after its imports); {r['n']} greedy tokens in {r['gen_s']:.1f} s "
                  f"({r['n'] / r['gen_s']:.2f} tok/s incl. prefill); peak RSS overall {r['peak'] / size:.2f}x")
            if fmt == "meta" and not a.keep:
                shutil.rmtree(folder)  # disk: only one 13.5 GB copy at a time
        meta, hf = torch.load(outs["meta"]), torch.load(outs["hf"])
        print(f"Meta-loaded vs HF-loaded llama_lite: logits identical: {torch.equal(meta['logits'], hf['logits'])}, "
              f"greedy tokens identical: {meta['tokens'] == hf['tokens']}")
        if not a.no_hf_reference:
            ref_out = root / "transformers.pt"
            r = run(HF, root / "hf", ref_out, outs["hf"], a.threads, a.tokens)
            ref = torch.load(ref_out)
            scale = ref["logits"].abs().max().item()
            for fmt in ("meta", "hf"):
                mine = torch.load(outs[fmt])
                diff = (mine["logits"] - ref["logits"]).abs().max().item()
                agree = next((i for i, (x, y) in enumerate(zip(mine["tokens"], ref["tokens"])) if x != y),
                             min(len(mine["tokens"]), len(ref["tokens"])))
                print(f"llama_lite ({fmt}) vs transformers, both bf16: max |logit diff| {diff:.4f} "
                      f"(logits span ±{scale:.2f}); top token equal: "
                      f"{int(mine['logits'].argmax()) == int(ref['logits'].argmax())}; "
                      f"greedy tokens agree for the first {agree} of {len(ref['tokens'])}")
            print(f"transformers load {r['load_s']:.1f} s, peak RSS {r['peak'] / results['hf']['size']:.2f}x the checkpoint")
        ok = all(r["peak_load"] / r["size"] <= 1.2 for r in results.values())
        print(f"peak RSS after load <= 1.2x the checkpoint (Meta and HF): {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    t0 = time.perf_counter()
    code = main()
    print(f"total {time.perf_counter() - t0:.0f} s")
    sys.exit(code)
