"""One command for the day a GPU is lent: the whole 7B path on random 7B-shaped weights, one report.

    python benchmarks/gpu_check.py                       # on a GPU machine: about 6 minutes on one H100/H200
    python benchmarks/gpu_check.py --layers 2 --device cpu --decode-tokens 4   # a smoke test anywhere

Needs torch, transformers, safetensors, sentencepiece and this package (not gguf, not SmolLM2's
wheel, not network). The Llama-2 tokenizer.model comes from --tokenizer (default
../shared/data/llama2-tokenizer.model beside the checkout; on a machine where ../shared is absent,
copy it into the checkout first, e.g. .gpu/llama2-tokenizer.model, and pass that path).

Steps, each timed, then one report:
  1. Write a Llama-2-7B-shaped checkpoint with random bf16 weights in Meta's layout and in Hugging
     Face's (benchmarks/synthetic.py), each with the tokenizer.
  2. Load each with `Llama.build(plan=...)` under the plan `llama_lite.devices.plan_fit` makes for
     this GPU; print load time, the peak GPU memory of a full-context prefill against the plan's
     estimate, and the next-token logits of the Meta load and of the HF load against transformers'
     `LlamaForCausalLM` on the same files.
  3. Execute notebook 07 end to end against the Meta folder (nbclient when installed, else its
     code cells in order in this process), save the executed notebook under --out, and print its
     outputs.
  4. Run benchmarks/decode_gpu.py (eager, compiled, transformers: decode tok/s against the
     bandwidth roofline), and an int8 vs 16-bit decode comparison through `Llama.build(quantize=)`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

REPORT: list = []


def say(line: str) -> None:
    print(line, flush=True)
    REPORT.append(line)


@contextlib.contextmanager
def step(name: str):
    t = time.perf_counter()
    print(f"\n=== {name}", flush=True)
    try:
        yield
    except Exception as e:  # one failing step must not hide the others' results
        import traceback

        traceback.print_exc()
        say(f"[{name}] FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        say(f"[{name}] {time.perf_counter() - t:.1f} s")


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def environment(device: torch.device) -> None:
    say(f"torch {torch.__version__}; device {device}")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        say(f"GPU {p.name}, capability {p.major}.{p.minor}, {gib(total)} total, {gib(free)} free")
    try:
        import transformers

        say(f"transformers {transformers.__version__}")
    except ImportError:
        say("transformers not installed: parity steps are skipped")


def build(folder: Path, device, **kw):
    from llama_lite import Llama

    return Llama.build(str(folder), device=device, **kw)


@torch.inference_mode()
def parity(ckpts: dict, device: torch.device, a) -> None:
    from llama_lite.checkpoint import read_model_args

    from llama_lite import Llama
    from llama_lite.devices import plan_fit

    args = read_model_args(ckpts["hf"])
    plan = plan_fit(args, device, max_seq_len=min(a.context, args.max_seq_len), dtype=a.dtype)
    for line in plan.describe().splitlines():
        say(line)
    logits = {}
    for fmt, folder in ckpts.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        llama = Llama.build(str(folder), plan=plan)
        load_s = time.perf_counter() - t
        prompt = llama.tokenizer.encode("The capital of France is", bos=True, eos=False)
        logits[fmt] = llama.model(torch.tensor([prompt], device=device), 0)[0, -1].float().cpu()
        dtype = llama.model.tok_embeddings.weight.dtype
        line = f"{fmt}: Llama.build {load_s:.1f} s, {dtype}"
        if device.type == "cuda":
            # the plan's worst case is a full-context prefill: run one, then compare the peak with it
            llama.model.setup_cache(1, plan.max_seq_len)
            llama.model(torch.randint(0, args.vocab_size, (1, plan.max_seq_len), device=device), 0)
            llama.model.clear_cache()
            peak = torch.cuda.max_memory_allocated(device)
            line += (f"; peak GPU memory after a {plan.max_seq_len}-token prefill {gib(peak)} vs the plan's "
                     f"estimate {gib(plan.total)} ({peak / plan.total:.0%})")
        say(line)
        del llama
    say(f"Meta-loaded and HF-loaded logits identical: {torch.equal(logits['meta'], logits['hf'])}")
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return
    hf = LlamaForCausalLM.from_pretrained(str(ckpts["hf"]), dtype=dtype).to(device).eval()
    ref = hf(torch.tensor([prompt], device=device)).logits[0, -1].float().cpu()
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    diff = (logits["meta"] - ref).abs().max().item()
    say(f"llama_lite vs transformers ({dtype}, same files): max |logit diff| {diff:.4f} of a ±{ref.abs().max():.2f} "
        f"span; same top token: {int(logits['meta'].argmax()) == int(ref.argmax())}")


def run_notebook(path: Path, out_dir: Path, env: dict) -> None:
    """Execute the notebook top to bottom: nbclient if present, else its code cells in order here."""
    os.environ.update(env)
    out_path = out_dir / path.name
    try:
        import nbformat
        from nbclient import NotebookClient

        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, out_path)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                text = o.get("text") or o.get("data", {}).get("text/plain", "")
                if text:
                    print(text if isinstance(text, str) else "".join(text), end="" if str(text).endswith("\n") else "\n")
        say(f"notebook executed with nbclient: {out_path}")
        return
    except ImportError:
        pass
    os.environ.setdefault("MPLBACKEND", "Agg")
    cells = json.loads(path.read_text())["cells"]
    namespace = {"__name__": "__main__"}
    try:
        from IPython.display import display
        namespace["display"] = display
    except ImportError:
        namespace["display"] = print
    cwd = os.getcwd()
    os.chdir(path.parent)
    log = io.StringIO()
    try:
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
            print(f"--- cell {i}", flush=True)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(src, f"{path.name}[{i}]", "exec"), namespace)
            print(buf.getvalue(), end="", flush=True)
            log.write(f"--- cell {i}\n{buf.getvalue()}")
    finally:
        os.chdir(cwd)
        (out_dir / (path.stem + "_outputs.txt")).write_text(log.getvalue())
    say(f"notebook's code cells executed in-process (nbclient absent); outputs in {out_dir / (path.stem + '_outputs.txt')}")


@torch.inference_mode()
def int8_vs_16bit(folder: Path, device: torch.device, a) -> None:
    from llama_lite.quantize import model_bytes
    from llama_lite.timing import time_prefill_decode

    for quantize in (None, "int8"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        llama = build(folder, device, max_seq_len=a.context, dtype=a.dtype, quantize=quantize)
        prompt = min(128, a.context - a.decode_tokens - 1)
        time_prefill_decode(llama.model, 16, 2)  # warm-up
        ttft, itl = time_prefill_decode(llama.model, prompt, a.decode_tokens)
        name = quantize or str(llama.model.tok_embeddings.weight.dtype).removeprefix("torch.")
        line = (f"{name}: weights {model_bytes(llama.model) / 1e9:.2f} GB, TTFT({prompt}) {ttft * 1e3:.1f} ms, "
                f"inter-token {itl * 1e3:.2f} ms = {1 / itl:.1f} tok/s")
        if device.type == "cuda":
            line += f", peak {gib(torch.cuda.max_memory_allocated(device))}"
        say(line)
        del llama


def main(argv=None) -> int:
    from synthetic import TOKENIZER, write_hf, write_meta

    from llama_lite import ModelArgs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: the package's policy for the device")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--skip", default="", help="comma-separated steps to skip: parity,notebook,decode,int8")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    device = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    environment(device)
    args = ModelArgs.from_name("llama2-7b").replace(n_layers=a.layers)
    root = a.dir or Path(tempfile.mkdtemp(prefix="llama7b-"))
    ckpts = {"meta": root / "meta", "hf": root / "hf"}
    with step("write 7B-shaped checkpoints"):
        for fmt, folder in ckpts.items():
            if not folder.exists():
                (write_meta if fmt == "meta" else write_hf)(args, folder, a.tokenizer)
    if "parity" not in skip:
        with step("load both formats, parity with transformers"):
            parity(ckpts, device, a)
    if "notebook" not in skip:
        with step("notebook 07 end to end (Meta folder)"):
            run_notebook(HERE.parent / "notebooks" / "07_llama2_7b_gpu.ipynb", a.out,
                         {"LLAMA2_CHECKPOINT": str(ckpts["meta"]), "LLAMA_LITE_FORCE_REAL": "1",
                          "LLAMA_LITE_DEVICE": str(device)})  # the device asked for, whatever the caller exported
    if "int8" not in skip:
        with step("int8 vs the plain dtype, decode"):
            int8_vs_16bit(ckpts["meta"], device, a)
    if "decode" not in skip:
        with step("benchmarks/decode_gpu.py"):
            import decode_gpu

            if a.layers < 32 or device.type != "cuda":  # a smoke test: decode_gpu's tiny config
                argv_ = ["--device", str(device), "--repeats", "1", "--tiny", "--no-compile"]
            else:
                argv_ = ["--device", str(device), "--repeats", "2", "--tokens", "128", "--prefill", "1024"]
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                decode_gpu.main(argv_)
            print(buf.getvalue())
            REPORT.extend(buf.getvalue().splitlines())
    print("\n===== REPORT")
    print("\n".join(REPORT))
    (a.out / "gpu_check_report.txt").write_text("\n".join(REPORT) + "\n")
    return 1 if any("FAILED" in line for line in REPORT) else 0


if __name__ == "__main__":
    sys.exit(main())
