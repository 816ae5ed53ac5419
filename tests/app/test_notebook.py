"""The quickstart notebook runs top to bottom (slow: it trains SmolLM2 for a few dozen steps)."""

from __future__ import annotations

import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])]
    assert any("parameters:" in text and "format: tailored" in text for text in outputs)
    assert any(text.startswith("When I was a boy") for text in outputs)
