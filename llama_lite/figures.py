"""Where notebooks save their figures: the repository's figures/ folder."""
from pathlib import Path


def figures_dir() -> Path:
    """figures/ at the top of the checkout (found from the working directory upwards), or
    ./figures when running outside one (Colab)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "llama_lite").is_dir():
            path = folder / "figures"
            break
    else:
        path = here / "figures"
    path.mkdir(exist_ok=True)
    return path


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib figure as figures/<name>.png (deterministic metadata, so re-running
    a notebook does not change the file) and return its path."""
    path = figures_dir() / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path
