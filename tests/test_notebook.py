"""The Colab demo runs headless on CPU and is committed without outputs."""

import os

import nbclient
import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "att3d_colab.ipynb")


def test_notebook_is_committed_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_notebook_executes_on_cpu(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()
  outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
  assert any(output.get("output_type") == "display_data" for output in outputs)
  assert not any(output.get("output_type") == "error" for output in outputs)
