"""``make site`` (``onestage.site``): the plan (default parameters where the shipped checkpoints allow, quick mode
otherwise), the rendered pages and index on hand-made executed notebooks, resuming and failing builds on tiny real
notebooks, and — in a headless Chromium, with the browser test's setup — the site built from two real walkthroughs
on this checkout: the index lists them, a chapter page loads and its figures decode."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from onestage import site

ROOT = Path(__file__).resolve().parents[1]


def _png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _executed(path: Path, title: str, sections, widget=False, learn=None) -> Path:
    nb = nbformat.v4.new_notebook()
    first = f"# {title}\n\nIntro.\n"
    if learn:
        first += f"\n**After it you can** {learn}\n\nMore text.\n"
    nb.cells.append(nbformat.v4.new_markdown_cell(first))
    for s in sections:
        nb.cells.append(nbformat.v4.new_markdown_cell(f"## {s}\n\ntext"))
        code = nbformat.v4.new_code_cell("plot()")
        code.outputs = [nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})]
        nb.cells.append(code)
    if widget:
        w = nbformat.v4.new_code_cell("explorer()")
        w.outputs = [nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
            "text/plain": "VBox(children=(...))"})]
        nb.cells.append(w)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _entry(path: Path, **kw) -> dict:
    return {"name": path.name, "executed": str(path), "mode": "default", "reason": "default parameters",
            "seconds": 12.0, "status": "finished", "error": None, "commit": "0123456789abcdef",
            "machine": "a 2-core x86_64 CPU", "finished_at": "2026-12-03 10:00 UTC", **kw}


def test_chapter_summary_reads_title_learning_goal_and_sections(tmp_path):
    path = _executed(tmp_path / "01_a.ipynb", "Lesson A — levels", ["1. Why", "2. How"],
                     learn="say which level a box goes to (FCOS §3.2).")
    s = site.chapter_summary(nbformat.read(path, as_version=4))
    assert s == {"title": "Lesson A — levels", "learn": "say which level a box goes to (FCOS §3.2).",
                 "sections": ["1. Why", "2. How"]}


def test_render_site_pages_index_links_and_widget_note(tmp_path):
    a = _executed(tmp_path / "01_a.ipynb", "Lesson A", ["1. Why: levels", "2. The paper's table"],
                  learn="pick the `level` of a box.")
    b = _executed(tmp_path / "02_b.ipynb", "Lesson B", ["Setup"], widget=True)
    out = tmp_path / "site"
    index = site.render_site([_entry(a), _entry(b, mode="quick", reason="quick mode was asked for",
                                                status="failed", error="ValueError: boom")], out)
    text = index.read_text()
    assert "Lesson A" in text and "Lesson B" in text
    assert "<strong>After it you can</strong> pick the <code>level</code> of a box." in text
    assert "quick mode was asked for" in text and "failed" in text
    page_a, page_b = (out / "01_a.html").read_text(), (out / "02_b.html").read_text()
    # every section link of the index points at an id its page really has
    links = re.findall(r'href="(0[12]_[ab]\.html)#([^"]+)"', text)
    assert len(links) == 3
    for page, anchor in links:
        ids = re.findall(r'<h2 id="([^"]+)"', (out / page).read_text())
        assert html.unescape(anchor) in ids
    # figures are embedded, widgets replaced by the note, navigation and execution facts in the banner
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', page_a)) == 2
    assert site.WIDGET_NOTE in page_b and "widget-view+json" not in page_b
    assert 'href="02_b.html">next →' in page_a and 'href="01_a.html">← previous' in page_b
    assert "at commit <code>0123456789ab</code>" in page_a and "in 12 s on a 2-core x86_64 CPU" in page_a
    assert "This execution failed (ValueError: boom)" in page_b
    assert "<title>Lesson A</title>" in page_a
    assert oct((out / "index.html").stat().st_mode & 0o777) != oct(0o600)  # readable by a web server


def test_plan_uses_defaults_when_checkpoints_exist_quick_otherwise():
    nbs = [ROOT / "notebooks" / n for n in ("00_quickstart.ipynb", "01_fcos_fpn_assignment.ipynb",
                                            "05_solo_grids.ipynb")]
    plans = site.plan_site(nbs, checkpoint_exists=lambda m: m != "decoupled_solo")
    assert [p.mode for p in plans] == ["default", "default", "quick"]
    assert plans[0].parameters == {"use_checkpoint": True} and plans[1].parameters == {}
    assert plans[2].parameters == {"quick": True} and "decoupled_solo" in plans[2].reason
    assert "shipped checkpoint of fcos" in plans[0].reason
    quick = site.plan_site(nbs, quick=True, checkpoint_exists=lambda m: True)
    assert all(p.mode == "quick" and p.parameters == {"quick": True} for p in quick)
    # the key changes with the parameters, so a quick page is not mistaken for a default one on resume
    assert quick[1].key != plans[1].key


def _tiny_notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny\n\n## Part"),
                nbformat.v4.new_code_cell("quick = False", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_build_site_resumes_and_keeps_going_after_a_failure(tmp_path):
    good = _tiny_notebook(tmp_path / "01_good.ipynb", "print('hello from', quick)")
    bad = _tiny_notebook(tmp_path / "02_bad.ipynb", "raise ValueError('corrupt annotation')")
    out, lines = tmp_path / "site", []
    r = site.build_site(out, [good, bad], quick=True, progress=False, log=lines.append)
    assert r["failed"] == ["02_bad.ipynb"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["01_good.ipynb"]["status"] == "finished" and manifest["02_bad.ipynb"]["status"] == "failed"
    assert "corrupt annotation" in manifest["02_bad.ipynb"]["error"]
    assert "hello from True" in (out / "01_good.html").read_text()
    assert "corrupt annotation" in (out / "02_bad.html").read_text()  # the page shows the error
    # a rerun executes only what failed or changed
    lines.clear()
    site.build_site(out, [good, bad], quick=True, progress=False, log=lines.append)
    assert any("01_good.ipynb: unchanged" in s for s in lines)
    assert any("02_bad.ipynb: executing" in s for s in lines)
    _tiny_notebook(good, "print('changed')")
    lines.clear()
    site.build_site(out, [good], quick=True, progress=False, log=lines.append)
    assert any("01_good.ipynb: executing" in s for s in lines)
    assert "changed" in (out / "01_good.html").read_text()


def test_cli_rejects_an_unknown_walkthrough(tmp_path):
    from onestage.cli import main

    assert main(["site", "--only", "99_nothing", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_site_of_two_walkthroughs_loads_in_chromium(tmp_path):
    from test_browser import CHROMIUM, _requirements

    _requirements()
    out = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "onestage", "site", "--quick", "--only", "01,02", "--out", str(out),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto((out / "index.html").as_uri())
            chapters = page.locator("li.chapter h2 a")
            assert chapters.count() == 2
            assert "FCOS, lesson 1" in chapters.nth(0).inner_text()
            chapters.nth(1).click()
            page.wait_for_load_state("load")
            assert page.url.endswith("02_centerness.html")
            assert "center-ness" in page.title()
            figures = page.eval_on_selector_all(
                "img", "els => els.filter(e => e.src.startsWith('data:image/png') && e.complete && e.naturalWidth > 0)"
                       ".length")
            assert figures >= 3
            assert page.locator(".onestage-site-banner").first.is_visible()
            page.locator(".onestage-site-banner a", has_text="contents").first.click()
            page.wait_for_load_state("load")
            assert page.url.endswith("index.html")
        finally:
            browser.close()
