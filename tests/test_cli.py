"""The command line, as a user runs it."""
import subprocess
import sys

from conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "llama_lite", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_generate_prints_the_greedy_continuation(llama):
    r = run("generate", "The capital of France is", "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    ids = llama.tokenizer.encode("The capital of France is", bos=False, eos=False)
    (expected,), _ = llama.generate([ids], 16, temperature=0)
    assert r.stdout == llama.tokenizer.decode(expected) + "\n"


def test_chat_answers():
    r = run("chat", "What is the capital of France?", "--max-new-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_input_is_one_clear_line():
    r = run("generate", "hello", "--top-p", "2")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: top_p must be in (0, 1] (1 keeps every token), got 2.0"
    r = run("generate", "hello", "--checkpoint", "/no/such/llama-2-7b")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not found" in r.stderr


def test_int8_generate(llama):
    import copy

    from llama_lite import Llama
    from llama_lite.quantize import quantize_model_int8

    r = run("generate", "The capital of France is", "--max-new-tokens", "8", "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    int8 = Llama(quantize_model_int8(copy.deepcopy(llama.model)), llama.tokenizer)
    ids = llama.tokenizer.encode("The capital of France is", bos=False, eos=False)
    (expected,), _ = int8.generate([ids], 8, temperature=0)
    assert r.stdout == llama.tokenizer.decode(expected) + "\n"
