"""Notebooks: every notebook has one literal-only ``parameters`` cell and the python3 kernelspec; the walkthrough
notebooks (``NN_*.ipynb``) run top to bottom in quick mode with papermill. ``experiment.ipynb`` is executed by
tests/test_experiments.py."""
import ast
from pathlib import Path

import nbformat
import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
WALKTHROUGHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
# text each walkthrough's executed outputs must contain (beyond "no error")
EXPECTED_OUTPUT = {
    "00_quickstart.ipynb": ["COCO AP on", "AP50", "run folder"],
    "06_explore_predictions.ipynb": ["(stride ", "generated filter numbers", "grid cell (i, j)", "over 4 bases"],
    "01_fcos_fpn_assignment.ipynb": ["| FCOS w/ FPN |", "positive locations"],
    "02_centerness.ipynb": ["| √(cls·ctr) (FCOS) |", "within-object Spearman",
                            "| reg | `{'centerness_on': 'reg'}` | 37.4"],
    "03_blendmask_blender.ipynb": ["| BlendMask blender", "Mask R-CNN mask head", "Claims to check"],
    "04_condinst_dynamic_heads.ipynb": ["dynamic parameters per instance: 169 = 80 + 8 + 64 + 8 + 8 + 1",
                                        "| head (100 instances) | params | ours: ms",
                                        "Mask R-CNN MaskRCNNHeads + predictor (28x28)"],
    "05_solo_grids.ipynb": ["channels k = i·S + j"],
    "07_error_analysis.ipynb": ["| classification | 1 | +50.0 |", "| model | type | AP50 (TIDE) |"],
}


def test_there_are_walkthroughs():
    assert WALKTHROUGHS, f"no NN_*.ipynb walkthrough in {NOTEBOOKS}"


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=[p.name for p in WALKTHROUGHS])
def test_walkthrough_states_goal_time_and_paper_sections_at_the_top(path):
    """What a student can do after it, how long it takes (with and without the shipped checkpoints) and which paper
    sections it covers, in the first cell; the site's index shows the first."""
    import re

    from onestage.site import chapter_summary

    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    for label in ("**After it you can**", "**Time on a 2-core laptop:**", "**Paper sections:**"):
        assert label in first.source, f"{path.name}: no {label} in the first cell"
    assert re.search(r"\*\*Time on a 2-core laptop:\*\* [^\n]*\d+ (s|min)", first.source)
    assert re.search(r"\*\*Paper sections:\*\*[^\n]*arXiv \d{4}\.\d{5}", first.source)
    assert chapter_summary(nb)["learn"]


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_parameters_cell_holds_literals_only(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert tagged[0] is first_code, "the parameters cell must be the first code cell"
    names = []
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            f"{path.name}: only `name = literal` lines belong in the parameters cell"
        ast.literal_eval(stmt.value)  # raises on anything but a literal
        names.append(stmt.targets[0].id)
    assert "quick" in names  # DESIGN: a quick parameter makes every notebook testable
    # papermill's own parser skips lines it cannot read (quotes, ':' or '=' in comments) with only a warning
    assert set(papermill.inspect_notebook(str(path))) == set(names)


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=[p.name for p in WALKTHROUGHS])
def test_walkthrough_runs_in_quick_mode(path, tmp_path):
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), kernel_name="python3", parameters=dict(quick=True),
                               execution_timeout=180, progress_bar=False, cwd=str(NOTEBOOKS))
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text"))
                     for o in outputs)
    for snippet in EXPECTED_OUTPUT.get(path.name, []):
        assert snippet in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "a walkthrough should draw its static figures"
