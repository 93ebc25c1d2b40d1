"""Run every notebook in notebooks/ from top to bottom, and check that they are stored clean.

Policy (see notebooks/README.md): notebooks are committed WITHOUT outputs and executed here, so that
what a learner reads is always what the current code produces. Each notebook runs in a fresh
``python3`` kernel whose interpreter is this one (``sys.executable``), in ``notebooks/`` as the
working directory, with ``MPLBACKEND=Agg`` (no display) and ``NPMNV3_OFFLINE=1`` (no network).
"""

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SERIES = ["01_activations", "02_convolution", "03_squeeze_excite", "04_bneck_and_network",
          "05_end_to_end", "06_agreement", "07_exercises", "08_segmentation", "09_detection",
          "10_quantization"]
CELL_TIMEOUT = 300   # seconds per cell


def kernel_manager():
    """A manager for the ``python3`` kernel that launches this very interpreter.

    ``kernel_dirs=[]`` ignores kernelspecs installed in the user's or the system's Jupyter
    folders (which may point at another Python); ``python3`` then resolves to ipykernel's
    built-in spec, whose command is ``[sys.executable, "-m", "ipykernel_launcher", ...]``.
    So the test works in a fresh venv with ipykernel installed, without
    ``python -m ipykernel install``.
    """
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    assert Path(km.kernel_spec.argv[0]).resolve() == Path(sys.executable).resolve(), km.kernel_spec.argv
    return km


def execute(path):
    """Execute the notebook at ``path`` in place (in memory); fail the test on the first error."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, km=kernel_manager(), kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} raised an error:\n{exc}", pytrace=False)
    return nb


def stream_text(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.fixture
def notebook_env(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("NPMNV3_OFFLINE", "1")
    return monkeypatch


def test_series_present():
    names = [p.stem for p in NOTEBOOKS]
    missing = [name for name in SERIES if name not in names]
    assert not missing, f"notebooks missing from {NOTEBOOK_DIR}: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; store notebooks "
                       f"clean (e.g. jupyter nbconvert --clear-output --inplace {path.name})")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env):
    execute(path)


def test_agreement_notebook_without_torch(tmp_path, notebook_env):
    """06_agreement says that torch is missing and stops cleanly instead of raising."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "torchvision"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    notebook_env.setenv("PYTHONPATH", str(blocked), prepend=os.pathsep)
    nb = execute(NOTEBOOK_DIR / "06_agreement.ipynb")
    assert "not installed" in stream_text(nb)
