"""Every notebook runs top to bottom with small settings; a cell that raises fails the test."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def small_settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    return {
        "MMCAP_NB_ROOT": str(root),
        "MMCAP_NB_DATA": str(root / "demo"),
        "MMCAP_NB_TRAIN": "400",
        "MMCAP_NB_STEPS": "20",
        "MMCAP_NB_MODEL": str(root / "model"),
        "MMCAP_NB_BEAMS": "1,2",
        "MMCAP_NB_LIMIT": "24",
    }


def run_notebook(name: str, env: dict) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(c.get("outputs") for c in book.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return book


# One test in order: 02 and 03 use the model that 01 trains and saves.
@pytest.mark.slow
def test_notebooks_run(small_settings):
    quick = run_notebook("01_quickstart.ipynb", small_settings)
    assert (Path(small_settings["MMCAP_NB_MODEL"]) / "model.safetensors").is_file()
    printed = "".join(o.get("text", "") for c in quick.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("references:") == 8  # one line per sample image
    attention = run_notebook("02_attention.ipynb", small_settings)
    assert any(o.get("data", {}).get("image/png") for c in attention.cells if c.cell_type == "code" for o in c.outputs)
    evaluation = run_notebook("03_evaluation.ipynb", small_settings)
    outputs = [o for c in evaluation.cells if c.cell_type == "code" for o in c.outputs]
    assert any("CIDEr" in str(o.get("data", {}).get("text/plain", "")) for o in outputs)


@pytest.mark.slow
def test_language_models_notebook(small_settings):
    book = run_notebook("04_language_models.ipynb", small_settings)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    printed = "".join(o.get("text", "") for o in outputs)
    assert "prefix" in printed and "cross_attention" in printed and "CIDEr" in printed
    assert sum(bool(o.get("data", {}).get("image/png")) for o in outputs) == 2  # an attention figure per fusion
