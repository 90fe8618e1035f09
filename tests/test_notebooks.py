"""Every notebook in notebooks/ runs from top to bottom in a fresh kernel without an error."""

import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.manager import KernelManager

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK_TIMEOUT_S = 300  # for a whole notebook; each should take well under a minute
KERNEL = "python3"


def test_the_notebooks_are_there():
    names = {path.name for path in NOTEBOOKS.glob("*.ipynb")}
    expected = {
        "01_quickstart.ipynb",
        "02_flax_training.ipynb",
        "03_rbm_contrastive_divergence.ipynb",
    }
    assert expected <= names


def test_the_kernel_is_this_python():
    # ipykernel's kernel spec says "python", which jupyter_client replaces by sys.executable:
    # the notebooks run in the environment of the tests, not in whatever python is on PATH.
    command = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert command[0] == sys.executable


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_the_stored_copy_is_executed_with_its_outputs(path):
    """The copy in the repository is the executed one (`make test-slow` re-runs it): every
    code cell ran in order, none failed, and the notebooks with plots store them."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert code and all(counts) and counts == sorted(counts), counts
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    if "matplotlib" in "".join(cell.source for cell in code):
        images = [
            out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})
        ]
        assert images, "a notebook that plots stores its figures"


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL,  # a fresh kernel for each notebook
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # run from notebooks/
    )
    client.execute()  # raises CellExecutionError (the cell and its traceback) on any error
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code)
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
