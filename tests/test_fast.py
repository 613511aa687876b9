"""Issue 12: the fast decode path gives the eager path's tokens; loading needs no compiler; the
GPU benchmark's CPU-runnable parts run. (The fast GGUF reader's checks are tests/test_gguf.py.)"""
import importlib.util
from pathlib import Path

import pytest
import torch

from llama_lite import ModelArgs
from llama_lite.fast import FastDecoder, apply_rope_real, greedy_generate
from llama_lite.model import Transformer
from llama_lite.positions import apply_rotary_emb, precompute_freqs_cis

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64, **kw)
    return Transformer(args).eval()


@torch.inference_mode()
def eager_greedy(model, prompt, n, use_cache=True):
    """Greedy decoding with the eager Transformer.forward, written out independently."""
    tokens = list(prompt)
    if use_cache:
        model.setup_cache(1, len(prompt) + n)
    try:
        logits = model(torch.tensor([tokens]), 0)
        for _ in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            if len(tokens) == len(prompt) + n:
                break
            logits = model(torch.tensor([tokens[-1:]]), len(tokens) - 1) if use_cache else model(torch.tensor([tokens]), 0)
    finally:
        model.clear_cache()
    return tokens[len(prompt):]


def test_rope_real_equals_complex():
    torch.manual_seed(0)
    f = precompute_freqs_cis(32, 20)
    q, k = torch.randn(2, 20, 4, 32), torch.randn(2, 20, 2, 32)
    rq, rk = apply_rotary_emb(q, k, f)
    torch.testing.assert_close(apply_rope_real(q, f.real, f.imag), rq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope_real(k, f.real, f.imag), rk, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_fast_logits_match_eager_tiny(n_kv_heads):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=16, max_seq_len=64)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        full = model(tokens)  # eager, no cache: (2, 12, vocab)
        dec = FastDecoder(model, batch_size=2, max_seq_len=20)
        torch.testing.assert_close(dec.prefill(tokens[:, :7]), full[:, 6], rtol=1e-5, atol=1e-5)
        for pos in range(7, 12):
            torch.testing.assert_close(dec.decode(tokens[:, pos:pos + 1], pos), full[:, pos], rtol=1e-5, atol=1e-5)


def test_bucketed_attention_masks_the_unfilled_tail():
    """The compiled path's shape: attend over a padded bucket with a mask. Checked eagerly here
    (compiled=True would need torch.compile); the stale slots hold garbage on purpose."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens)
        dec = FastDecoder(model, max_seq_len=32)
        for c in dec.k_cache + dec.v_cache:
            c.normal_()  # unfilled slots must not matter
        dec.prefill(tokens[:, :5])
        for pos in range(5, 10):
            logits = dec.forward(tokens[:, pos:pos + 1], torch.tensor([pos]), kv_len=16)[:, -1]
            torch.testing.assert_close(logits, full[:, pos], rtol=1e-5, atol=1e-5)


def test_fast_greedy_equals_eager_tiny():
    model = tiny_model(seed=3)
    prompt = [5, 17, 42, 8]
    n = 40
    eager = eager_greedy(model, prompt, n)
    assert greedy_generate(model, prompt, n) == eager
    assert eager_greedy(model, prompt, n, use_cache=False) == eager  # cached == uncached


def test_fast_greedy_equals_llama_generate_smollm2(llama):
    prompt = llama.tokenizer.encode("The history of the printing press", bos=llama.tokenizer.add_bos, eos=False)
    eager = llama.generate([prompt], 48, temperature=0)[0][0]
    fast = greedy_generate(llama.model, prompt, 48, stop_ids=llama.tokenizer.stop_ids)
    assert len(eager) > 10 and fast == eager
    uncached = llama.generate([prompt], 16, temperature=0, use_cache=False)[0][0]
    assert uncached == eager[:16]


def test_compiled_cpu_path_equals_eager_and_uses_inductor_gemm():
    """compile=True on a CPU: frozen weights, inductor's C++ GEMM kernels. Same greedy tokens as
    the eager Transformer.forward; and the C++ GEMM templates really were used (without the
    freezing flag set while dynamo traces, the graph silently keeps calling MKL's one-core sgemv)."""
    from torch._dynamo.utils import counters

    model = tiny_model(seed=5)
    prompt = [3, 14, 15, 92, 65]
    eager = eager_greedy(model, prompt, 20)
    counters.clear()
    with torch.inference_mode():
        dec = FastDecoder(model, 1, len(prompt) + 20, compile=True)
        assert greedy_generate(model, prompt, 20, decoder=dec) == eager
        assert greedy_generate(model, prompt, 20, decoder=dec) == eager  # the graph is reused, cache rewritten
    assert counters["inductor"]["cpp_templated_kernel_counter"] > 0


def test_compiled_cpu_path_refuses_int8():
    from llama_lite.quantize import quantize_model_int8

    model = quantize_model_int8(tiny_model())
    with pytest.raises(ValueError, match="int8"):
        FastDecoder(model, 1, 16, compile=True)


def test_fast_decoder_errors():
    model = tiny_model()
    dec = FastDecoder(model, batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="batch"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="past the cache"):
        dec.prefill(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        FastDecoder(model, max_seq_len=1000)
    with pytest.raises(ValueError, match="empty"):
        greedy_generate(model, [], 3)


# -- loading --------------------------------------------------------------------------------------
def test_loading_does_not_import_the_compiler(smollm2_path):
    """Building the empty model on the meta device used to run nn.init and the RoPE table
    through PyTorch's reference implementations, whose first use imports torch._dynamo: about
    1.5 s of every process's first load. Loading must not need the compiler."""
    import subprocess
    import sys

    code = ("import sys; from llama_lite import Llama; Llama.build(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


# -- the GPU benchmark's CPU-runnable parts ---------------------------------------------------------
def test_decode_gpu_script_tiny_cpu(capsys):
    spec = importlib.util.spec_from_file_location("decode_gpu", ROOT / "benchmarks" / "decode_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tps, outs = mod.main(["--tiny", "--device", "cpu", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "roofline" in text and "MFU" in text
    assert set(tps) == {"llama_lite eager", "llama_lite fast", "transformers eager"}
    assert all(v > 0 for v in tps.values())
    first = outs["llama_lite eager"]
    assert len(first) == 16 and outs["llama_lite fast"] == first and outs["transformers eager"] == first
