"""``make site``: the walkthroughs executed and rendered as a static HTML site a student can read anywhere.

:func:`build_site` executes every walkthrough (``notebooks/NN_*.ipynb``) with papermill, one after another, and
:func:`render_site` turns the executed notebooks into ``<out>/<name>.html`` pages (nbconvert's lab template, figures
embedded) plus ``<out>/index.html``: a table of contents with each chapter's title, what a student can do after it,
its sections (linked), how it was executed and how long that took.

Which parameters a page is executed with (:data:`SITE_RUNS`): the notebook's defaults where the shipped
checkpoints make that affordable (the quickstart with ``use_checkpoint=True``), its ``quick`` mode otherwise — when a
checkpoint it needs is missing, or when ``quick=True`` is asked for (tests). Every page says which at its top.

A widget needs a live kernel, so on the site every widget output is replaced by a note; each widget in these
notebooks follows a static figure of the same view (a rule of the suite), which the page keeps.

Long runs resume: ``<out>/manifest.json`` records each finished notebook with the hash of its source and its
parameters, and a rerun executes only what is missing or changed. A notebook that fails keeps its partly executed
copy and page (the error is visible there), the others still run, and the build ends with a non-zero status.
"""
from __future__ import annotations

import hashlib
import html
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from onestage.experiments.records import write_json_atomic, write_text_atomic

__all__ = ["SITE_RUNS", "SitePlan", "WIDGET_NOTE", "build_site", "chapter_summary", "default_site_dir",
           "plan_site", "render_site", "walkthroughs"]

_REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = _REPO / "notebooks"

#: Per walkthrough: the parameters of its site run and the shipped checkpoints (model names) those need. A
#: walkthrough not listed runs with its defaults and needs none.
SITE_RUNS: dict[str, dict] = {
    "00_quickstart.ipynb": {"parameters": {"use_checkpoint": True}, "checkpoints": ["fcos"]},
    "02_centerness.ipynb": {"checkpoints": ["fcos"]},
    "03_blendmask_blender.ipynb": {"checkpoints": ["blendmask"]},
    "04_condinst_dynamic_heads.ipynb": {"checkpoints": ["condinst"]},
    "05_solo_grids.ipynb": {"checkpoints": ["solov2", "decoupled_solo"]},
    "06_explore_predictions.ipynb": {"checkpoints": ["fcos", "condinst", "blendmask", "solov2", "solo",
                                                     "decoupled_solo"]},
    "07_error_analysis.ipynb": {"checkpoints": ["fcos", "condinst", "blendmask", "solov2", "solo",
                                                "decoupled_solo"]},
}

WIDGET_NOTE = ("<p class=\"onestage-widget-note\"><em>An interactive widget was here: it needs a running kernel. "
               "Open the notebook in JupyterLab (<code>make lab</code>) to use it; the static figure above shows the "
               "same view.</em></p>")
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def default_site_dir() -> Path:
    return _REPO / "runs" / "site"


def walkthroughs(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The walkthrough notebooks in reading order (``NN_*.ipynb``; ``experiment.ipynb`` is the sweep template)."""
    return sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))


@dataclass
class SitePlan:
    """How one walkthrough is executed for the site."""
    notebook: Path
    parameters: dict
    mode: str     # "default" or "quick"
    reason: str   # said on the page
    key: str = field(default="")  # hash of the source + parameters (resume)


def _source_hash(path: Path, parameters: dict) -> str:
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    return h.hexdigest()[:16]


def plan_site(notebooks: Sequence[Path], quick: bool = False,
              checkpoint_exists: Optional[Callable[[str], bool]] = None) -> list[SitePlan]:
    """The execution plan: the default parameters (plus :data:`SITE_RUNS`' overrides) where every shipped checkpoint
    a walkthrough needs exists, quick mode otherwise (or for all with ``quick=True``)."""
    if checkpoint_exists is None:
        from onestage.engine.shipped import shipped_checkpoint

        def checkpoint_exists(model: str) -> bool:
            return shipped_checkpoint(model).is_file()

    plans = []
    for nb in notebooks:
        spec = SITE_RUNS.get(Path(nb).name, {})
        missing = [m for m in spec.get("checkpoints", []) if not checkpoint_exists(m)]
        if quick:
            params, mode, reason = {"quick": True}, "quick", "quick mode was asked for (`--quick`)"
        elif missing:
            params, mode = {"quick": True}, "quick"
            reason = (f"quick mode: the shipped checkpoint{'s' if len(missing) > 1 else ''} of "
                      f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing "
                      "(`python -m onestage checkpoints` makes them)")
        else:
            params, mode = dict(spec.get("parameters", {})), "default"
            needs = spec.get("checkpoints", [])
            reason = "default parameters" + (f", with the shipped checkpoint{'s' if len(needs) > 1 else ''} of "
                                             f"{', '.join(needs)}" if needs else "")
            if params:
                reason += " (" + ", ".join(f"`{k}={v!r}`" for k, v in params.items()) + ")"
        plans.append(SitePlan(Path(nb), params, mode, reason, _source_hash(Path(nb), params)))
    return plans


# ----------------------------------------------------------------------------------------------------------------
# rendering

def chapter_summary(nb) -> dict:
    """Title (the first ``#`` heading), the "After it you can" sentence if the notebook states one, and the ``##``
    section headings of an (executed or not) notebook node."""
    title, learn, sections = None, None, []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            s = line.strip()
            if s.startswith("# ") and title is None:
                title = s[2:].strip()
            elif s.startswith("## "):
                sections.append(s[3:].strip())
        if learn is None:
            m = re.search(r"\*\*After it you can\*\*\s*(.+?)(?:\n\s*\n|$)", cell.source, re.S)
            if m:
                learn = " ".join(m.group(1).split())
    return {"title": title or "(untitled)", "learn": learn, "sections": sections}


def _strip_widgets(nb) -> int:
    """Replace every widget output by :data:`WIDGET_NOTE`; returns how many were replaced."""
    import nbformat

    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if _WIDGET_MIME in out.get("data", {}):
                n += 1
                outputs.append(nbformat.v4.new_output("display_data", data={"text/html": WIDGET_NOTE,
                                                                            "text/plain": "[widget]"}))
            else:
                outputs.append(out)
        cell["outputs"] = outputs
    nb.metadata.pop("widgets", None)
    return n


def _md_inline(text: str) -> str:
    """The little markdown the index shows (``code``, **bold**, *em*, $math$ kept as text), HTML-escaped."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<!\*)\*([^*]+)\*(?!\*)", r"<em>\1</em>", s)
    return s


def _heading_ids(page_html: str) -> dict[str, str]:
    """``h2`` text → the id nbconvert gave it (so the index links where the page really anchors)."""
    ids = {}
    for m in re.finditer(r"<h2 id=\"([^\"]+)\"[^>]*>(.*?)</h2>", page_html, re.S):
        text = re.sub(r"<[^>]+>", "", m.group(2)).replace("¶", "").strip()
        ids[html.unescape(text)] = m.group(1)
    return ids


def _banner(entry: dict, prev_page: Optional[str], next_page: Optional[str]) -> str:
    nav = ['<a href="index.html">contents</a>']
    if prev_page:
        nav.insert(0, f'<a href="{prev_page}">← previous</a>')
    if next_page:
        nav.append(f'<a href="{next_page}">next →</a>')
    status = "" if entry.get("status") == "finished" else (
        f' <strong>This execution failed ({html.escape(str(entry.get("error", "")))}); the page shows the notebook '
        'up to the failing cell.</strong>')
    return (
        '<div class="onestage-site-banner" style="border:1px solid #ccc;background:#f7f7f7;padding:0.5em 1em;'
        'margin:0.5em 0 1em 0;font-family:sans-serif;font-size:0.9em">'
        f'<div>{" · ".join(nav)}</div>'
        f'<div>Executed {html.escape(entry.get("finished_at", "?"))} from <code>notebooks/{html.escape(entry["name"])}'
        f'</code> at commit <code>{html.escape(str(entry.get("commit") or "unknown")[:12])}</code>: '
        f'<strong>{html.escape(entry["reason"])}</strong>, in {entry.get("seconds", 0):.0f} s on '
        f'{html.escape(entry.get("machine", "?"))}.{status}</div></div>')


def render_site(entries: Sequence[dict], out: Path) -> Path:
    """Write one HTML page per executed notebook in ``entries`` (dicts with ``name``, ``executed`` — the executed
    notebook's path —, ``mode``, ``reason``, ``seconds``, ``status``…) and ``index.html``; returns the index path."""
    import nbformat

    from onestage.quickstart import notebook_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pages = [Path(e["name"]).with_suffix(".html").name for e in entries]
    chapters = []
    for i, entry in enumerate(entries):
        nb = nbformat.read(entry["executed"], as_version=4)
        summary = chapter_summary(nb)
        widgets = _strip_widgets(nb)
        body = notebook_html(nb)
        body = body.replace("<title>Notebook</title>", f"<title>{html.escape(summary['title'])}</title>", 1)
        banner = _banner(entry, pages[i - 1] if i else None, pages[i + 1] if i + 1 < len(pages) else None)
        body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + banner, body, count=1)
        write_text_atomic(out / pages[i], body)
        figures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if "image/png" in o.get("data", {}))
        chapters.append({**summary, "page": pages[i], "ids": _heading_ids(body), "entry": entry,
                         "figures": figures, "widgets": widgets})

    items = []
    for ch in chapters:
        e = ch["entry"]
        secs = "".join(
            f'<li><a href="{ch["page"]}#{html.escape(ch["ids"][s], quote=True)}">{_md_inline(s)}</a></li>'
            if s in ch["ids"] else f"<li>{_md_inline(s)}</li>" for s in ch["sections"])
        failed = "" if e.get("status") == "finished" else ' — <strong>failed</strong>'
        items.append(
            f'<li class="chapter"><h2><a href="{ch["page"]}">{_md_inline(ch["title"])}</a></h2>'
            + (f'<p>{_md_inline("**After it you can** " + ch["learn"])}</p>' if ch["learn"] else "")
            + f'<p class="meta"><code>notebooks/{html.escape(e["name"])}</code> · {_md_inline(e["reason"])} · '
              f'{e.get("seconds", 0):.0f} s · {ch["figures"]} figures'
            + (f' · {ch["widgets"]} widget{"s" if ch["widgets"] > 1 else ""} (live in JupyterLab)'
               if ch["widgets"] else "") + f'{failed}</p>'
            + (f"<ul>{secs}</ul>" if secs else "") + "</li>")
    first = entries[0] if entries else {}
    index = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>onestage walkthroughs</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
        "li.chapter{list-style:none;margin-bottom:1.5em}ul{padding-left:1.2em}.meta{color:#555;font-size:0.9em}"
        "</style></head><body>"
        "<h1>onestage walkthroughs</h1>"
        "<p>FCOS, BlendMask, CondInst and SOLO / SOLOv2, one idea at a time, executed: every figure below was made "
        f"by the notebooks themselves at commit <code>{html.escape(str(first.get('commit') or 'unknown')[:12])}"
        f"</code> on {html.escape(first.get('machine', '?'))}. Run them yourself with <code>make lab</code>; "
        "rebuild this site with <code>make site</code>.</p>"
        f"<ol style=\"padding-left:0\">{''.join(items)}</ol></body></html>\n")
    return write_text_atomic(out / "index.html", index)


# ----------------------------------------------------------------------------------------------------------------
# execution

def _machine() -> str:
    import os

    return f"a {os.cpu_count()}-core {platform.machine()} CPU"


def build_site(out: Optional[Path] = None, notebooks: Optional[Sequence[Path]] = None, quick: bool = False,
               force: bool = False, progress: bool = True, kernel_name: str = "python3",
               execution_timeout: Optional[int] = None, log: Callable[[str], None] = None) -> dict:
    """Execute the walkthroughs (all by default) into ``<out>/executed/`` and render the site into ``out``
    (default ``runs/site``). Finished notebooks whose source and parameters are unchanged are not executed again
    (``force=True`` re-executes). Returns ``{"index": path, "entries": [...], "failed": [names]}``."""
    import papermill

    from onestage.engine.checkpoint import git_commit

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out) if out is not None else default_site_dir()
    executed_dir = out / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    notebooks = [Path(p) for p in (notebooks if notebooks is not None else walkthroughs())]
    if not notebooks:
        raise ValueError("no walkthrough notebooks to build a site from")
    for p in notebooks:
        if not p.is_file():
            raise FileNotFoundError(f"no notebook at {p}")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    commit = git_commit(_REPO)
    entries = []
    plans = plan_site(notebooks, quick=quick)
    for i, plan in enumerate(plans, 1):
        name = plan.notebook.name
        executed = executed_dir / name
        old = manifest.get(name)
        if (not force and old and old.get("status") == "finished" and old.get("key") == plan.key
                and executed.is_file()):
            log(f"[{i}/{len(plans)}] {name}: unchanged since {old.get('finished_at')}, not executed again")
            entries.append({**old, "executed": str(executed)})
            continue
        log(f"[{i}/{len(plans)}] {name}: executing ({plan.reason}) ...")
        t0 = time.time()
        status, error = "finished", None
        tmp = executed.with_name(executed.name + ".partial.ipynb")
        try:
            papermill.execute_notebook(str(plan.notebook), str(tmp), parameters=plan.parameters,
                                       kernel_name=kernel_name, cwd=str(plan.notebook.parent),
                                       progress_bar=progress, execution_timeout=execution_timeout)
        except Exception as e:  # a failing notebook keeps its partial copy; the other chapters still build
            if not tmp.is_file():
                raise
            status, error = "failed", f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
            log(f"    FAILED: {error}")
        tmp.replace(executed)
        entry = {"name": name, "key": plan.key, "parameters": plan.parameters, "mode": plan.mode,
                 "reason": plan.reason, "seconds": round(time.time() - t0, 1), "status": status, "error": error,
                 "commit": commit, "machine": _machine(),
                 "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        manifest[name] = entry
        write_json_atomic(manifest_path, manifest)
        log(f"    {status} in {entry['seconds']:.0f} s")
        entries.append({**entry, "executed": str(executed)})
    index = render_site(entries, out)
    failed = [e["name"] for e in entries if e["status"] != "finished"]
    return {"index": index, "entries": entries, "failed": failed}
