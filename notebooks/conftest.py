"""Settings for `pytest --nbval notebooks/`."""
import os
import tempfile


def pytest_configure(config):
    # Notebook kernels inherit this: figures a test run draws go to a scratch folder, so running
    # the tests never rewrites the committed figures/ (git status stays clean).
    os.environ.setdefault("LLAMA_LITE_FIGURES_DIR", tempfile.mkdtemp(prefix="llama-lite-figures-"))
