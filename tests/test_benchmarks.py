"""The benchmarks' code paths on tiny configs, so they cannot rot unseen (their figures come
from full runs; nothing here is timed)."""
import importlib.util
import re
import subprocess
import sys

from conftest import ROOT


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_runs_tiny_on_cpu():
    """benchmarks/load_7b_gpu.py --tiny: the 7B benchmark's code path (write both formats, load,
    compare with transformers, time prefill/decode) on a tiny config, so it cannot rot unseen."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_7b_gpu.py"), "--tiny"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert sum("vs transformers" in line and line.endswith("PASS") for line in lines) == 2, r.stdout
    assert lines[-1] == "PASS"


def test_decode_gpu_script_tiny_cpu(capsys):
    """benchmarks/decode_gpu.py --tiny on the CPU: eager, compiled and transformers decode the
    same greedy tokens."""
    tps, outs = _module("decode_gpu").main(["--tiny", "--device", "cpu", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "roofline" in text and "MFU" in text
    assert set(tps) == {"llama_lite eager", "llama_lite compiled", "transformers eager"}
    assert all(v > 0 for v in tps.values())
    first = outs["llama_lite eager"]
    assert len(first) == 16 and outs["llama_lite compiled"] == first and outs["transformers eager"] == first


def test_decode_cpu_script_quick(smollm2_path):
    """benchmarks/decode_cpu.py, its smallest run: the CPU line, the table, the quality lines."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_cpu.py"), "--quick", "--tokens", "4",
                        "--no-hf", "--no-compile", "--no-llama-cpp"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "kernels:" in out.splitlines()[0]  # the CPU described first
    assert "llama_lite cached" in out and "llama_lite int8 cached" in out and "roofline" in out
    assert "greedy tokens identical: cached vs uncached (4): True" in out
    assert "the 211 nn.Linear of one decode step, nothing else" in out  # SmolLM2: 30 x 7 + the output
    assert "llama_lite, W (out, in)" in out and "W^T vs W (out, in): " in out  # both layouts, side by side
    assert re.search(r"4 rows at once .*: W\^T [\d.]+ ms, W \(out, in\) [\d.]+ ms", out), out
    assert re.search(r"a \d+-token prompt, one forward: W\^T \d+ ms, W \(out, in\) \d+ ms", out), out
    assert re.search(r"int8: \d+ MB read per token; KL \d\.\d{4}, top-1 \d+\.\d%, perplexity x\d\.\d{3} \(", out), out
    from llama_lite.quantize import w8a8_available

    if w8a8_available()[0]:
        assert "llama_lite w8a8 cached" in out and "llama_lite w8a8, W_2 float16" in out
        assert "llama_lite w8a8, W_2 rot only" in out and "W8A8 with only W_2 rotated" in out
        assert "token by token, as decoded: KL" in out
        assert "feed_forward.w2  KL" in out and "W_2 not rotated  KL" in out
        assert "W8A8 without smoothing: KL" in out and "W8A8 with W_2 in float16 instead" in out
    else:
        assert "w8a8 row skipped: " + w8a8_available()[1] in out
