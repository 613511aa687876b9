"""The command line (llama_lite/__main__.py), as a user runs it: each command's output equals the
Python API's, and its flags reach Llama.build. (Each bad input's message: tests/test_errors.py.)"""
import copy

import pytest

from conftest import run_llama_lite as run
from llama_lite import Llama
from llama_lite import __main__ as cli
from llama_lite.quantize import quantize_model_int8


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


def test_bad_input_exits_2_with_one_line():
    """What reaches the shell: exit status 2 and one line on stderr, no traceback, for a mistake
    caught before loading and for a checkpoint that is not there."""
    r = run("generate", "hello", "--top-p", "2")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0
    r = run("generate", "hello", "--checkpoint", "/no/such/llama-2-7b")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not found" in r.stderr


@pytest.mark.parametrize("kind", ["int8", "w8a8"])
def test_int8_generate(llama, kind):
    """--quantize prints what the same quantization of the loaded model generates in-process,
    on a prompt whose quantized continuation differs from float32's (so an ignored flag fails).
    Which prompt that is depends on the CPU and the torch version (a near-tie can fall either
    way), so the first of a few where the two differ here is used."""
    from llama_lite.quantize import quantize_model_w8a8, w8a8_available

    if kind == "w8a8" and not w8a8_available()[0]:
        pytest.skip(w8a8_available()[1])
    quantize = quantize_model_int8 if kind == "int8" else quantize_model_w8a8
    int8 = Llama(quantize(copy.deepcopy(llama.model)), llama.tokenizer)
    for prompt in ("My favourite food is", "The history of the printing press", "Once upon a time",
                   "The best way to learn", "def fibonacci(n):"):
        ids = llama.tokenizer.encode(prompt, bos=False, eos=False)
        (expected,), _ = int8.generate([ids], 8, temperature=0)
        (full,), _ = llama.generate([ids], 8, temperature=0)
        if expected != full:  # the test can tell the flag from its absence
            break
    else:
        pytest.fail(f"{kind}'s greedy tokens equal float32's on every prompt tried: add a prompt")
    r = run("generate", prompt, "--max-new-tokens", "8", "--quantize", kind)
    assert r.returncode == 0, r.stderr
    assert r.stdout == llama.tokenizer.decode(expected) + "\n"


def test_num_beams_prints_the_beam_search_result(llama):
    prompt = "The capital of France is"
    r = run("generate", prompt, "--max-new-tokens", "12", "--num-beams", "4")
    assert r.returncode == 0, r.stderr
    ids = llama.tokenizer.encode(prompt, bos=False, eos=False)
    expected, _ = llama.beam_search(ids, 4, 12)
    assert r.stdout == llama.tokenizer.decode(expected) + "\n"


def test_compile_flag_reaches_build(monkeypatch, capsys):
    seen = {}

    def fake_build(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(Llama, "build", staticmethod(fake_build))
    assert cli.main(["generate", "hi", "--compile"]) == 2
    assert seen["compile"] is True
    seen.clear()
    assert cli.main(["generate", "hi"]) == 2
    assert not seen.get("compile", False)
    assert "stop here" in capsys.readouterr().err
