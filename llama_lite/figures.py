"""Where notebooks save their figures: the repository's figures/ folder."""
import os
from pathlib import Path


def figures_dir() -> Path:
    """figures/ at the top of the checkout (found from the working directory upwards), or
    ./figures when running outside one (Colab). LLAMA_LITE_FIGURES_DIR overrides both: the test
    run sets it (conftest.py), so `pytest --nbval` never rewrites a committed figure."""
    override = os.environ.get("LLAMA_LITE_FIGURES_DIR")
    if override:
        path = Path(override)
    else:
        here = Path.cwd().resolve()
        for folder in (here, *here.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "llama_lite").is_dir():
                path = folder / "figures"
                break
        else:
            path = here / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib figure as figures/<name>.png (no software-version metadata, so the
    file depends only on what is drawn) and return its path."""
    path = figures_dir() / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path
