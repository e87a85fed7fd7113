"""The quickstart notebook runs top to bottom on the tiny model and saves a result for every task."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bernini_diffusers.media import read_video
from bernini_diffusers.tasks import TASKS

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install nbclient ipykernel)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
MEDIA_VARIABLES = (
    "BERNINI_MODEL", "BERNINI_VIDEO", "BERNINI_INSERT_VIDEO", "BERNINI_IMAGE", "BERNINI_REFERENCES", "BERNINI_LONG_VIDEO"
)  # fmt: skip


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_every_task_on_the_tiny_model(tmp_path, monkeypatch):
    for name in MEDIA_VARIABLES:  # the defaults: the tiny model and media made in the notebook
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell; `timeout` bounds each cell

    for cell in code_cells(notebook):
        assert cell.execution_count is not None, cell.source[:60]
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:60]
    outputs = tmp_path / "outputs" / "quickstart"
    for task, spec in TASKS.items():
        if spec.is_image:
            with Image.open(outputs / f"{task.value}.png") as image:
                assert image.size == (48, 32), task  # SIZE for t2i, the source image's for i2i
        else:
            frames, fps = read_video(outputs / f"{task.value}.mp4")
            assert len(frames) >= 5 and fps == 16, task
    # The long-video section edits the whole 33-frame source in context windows, not its first `num_frames`.
    frames, _ = read_video(outputs / "v2v_long.mp4")
    assert len(frames) == 33
    # Every video was shown inline (one per video task, and the long edit), and the last cell lists the results.
    html = [o.get("data", {}).get("text/html", "") for cell in code_cells(notebook) for o in cell.outputs]
    shown = [text for text in html if "<video" in text]
    assert len(shown) == sum(not spec.is_image for spec in TASKS.values()) + 1
    listing = code_cells(notebook)[-1].outputs[0]["data"]["text/plain"]
    assert all(f"'{task.value}." in listing for task in TASKS)
