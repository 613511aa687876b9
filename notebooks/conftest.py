"""Settings for `pytest --nbval notebooks/`."""
import os
import tempfile


def pytest_configure(config):
    # Notebook kernels inherit these. Figures a test run draws go to a scratch folder, so running
    # the tests never rewrites the committed figures/ (git status stays clean).
    os.environ.setdefault("LLAMA_LITE_FIGURES_DIR", tempfile.mkdtemp(prefix="llama-lite-figures-"))
    # Notebook 07 runs on the GPU where there is one; its committed outputs come from the CPU path,
    # so the tests run that path everywhere (benchmarks/gpu_check.py runs 07 outside pytest, on the GPU).
    os.environ.setdefault("LLAMA_LITE_DEVICE", "cpu")
