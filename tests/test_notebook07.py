"""Notebook 07's real-checkpoint path (what a GPU user with Llama-2 runs), executed end to end on
the CPU against a tiny random checkpoint in Meta's format, with the real Llama-2 tokenizer beside
it (vocab 32000). LLAMA_LITE_FORCE_REAL=1 makes the notebook load it instead of the stand-in."""
import pytest
import torch

from conftest import ROOT, tiny_meta

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5}


def test_notebook07_runs_a_meta_checkpoint_end_to_end(llama2_tokenizer_path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    ckpt = tmp_path / "llama-2-tiny"
    tiny_meta(ckpt, PARAMS, vocab_size=32000, dtype=torch.bfloat16, tokenizer=llama2_tokenizer_path)
    monkeypatch.setenv("LLAMA2_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("LLAMA_LITE_FORCE_REAL", "1")
    monkeypatch.setenv("LLAMA_LITE_FIGURES_DIR", str(tmp_path / "figures"))
    nb = nbformat.read(ROOT / "notebooks" / "07_llama2_7b_gpu.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert f"Running {ckpt} on the CPU (LLAMA_LITE_FORCE_REAL=1)" in text
    assert "STAND-IN" not in text
    assert "model: dim 64, 2 layers, 4 heads / 4 KV heads" in text
    assert "with a 4,096-token context" in text  # the checkpoint's own context, as the plan gave it
    assert "greedy continuations agree on the first" in text  # int8 rebuilt from the checkpoint
    assert text.count("Verdict:") == 4
