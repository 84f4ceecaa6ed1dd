"""Gather reproduction records into a table beside the paper's numbers, and check each claim's sign.

Why signs and not values: onestage reproduces ablations at laptop scale (small images, minutes of training,
synthetic data), where absolute APs are nowhere near COCO numbers. What *can* transfer is the direction of an effect:
"depth 1 is worse than depth 3", "center-ness helps". So for every ``expect`` claim of a table the aggregator compares
the sign of our mean difference with the paper's, and says separately whether our difference is larger than the
seed-to-seed noise (so that a "matches" inside the noise is not over-read). Seed ``k`` of every row shares the data
order and the pretrained weights, so much of the seed-to-seed spread moves all rows together; the per-seed
differences (row a seed k − row b seed k) are reported beside the means, with whether every seed agrees in sign.

Everything here is plain Python (lists of dicts), so it works without pandas; :func:`markdown` renders the text
table and :func:`figure` a matplotlib Figure.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional, Union

from onestage.experiments.records import iter_records
from onestage.experiments.tables import Claim, PaperTable, load_table

__all__ = ["collect", "check_claims", "markdown", "figure", "report", "get_metric", "csv_text", "write_report"]


def get_metric(record: dict, path: str) -> Optional[float]:
    """``record["metrics"]["segm"]["AP"]`` for ``path="segm.AP"``; ``record["cost"]["inference_ms"]`` for
    ``path="cost.inference_ms"`` (a section the record keeps beside its metrics); None when absent or not a finite
    number."""
    section, name = path.split(".", 1)
    holder = (record.get("metrics") or {}).get(section)
    if holder is None and section == "cost":
        holder = record.get("cost")
    value = (holder or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _stats(values: list[float]) -> dict:
    n = len(values)
    return {
        "n": n,
        "values": values,
        "mean": statistics.fmean(values) if n else None,
        "std": statistics.stdev(values) if n >= 2 else None,  # sample std; undefined for one seed
    }


def collect(table: PaperTable, results_dir: Union[str, Path]) -> list[dict]:
    """One dict per table row: our per-metric mean/std over finished seeds, the published numbers, failures.

    Records of rows the table does not know are ignored (a renamed row leaves stale files behind).
    """
    by_row: dict[str, list[dict]] = {r.name: [] for r in table.rows}
    for row, seed, rec in iter_records(results_dir):
        if row in by_row:
            by_row[row].append({**rec, "_seed": seed})
    out = []
    for r in table.rows:
        recs = by_row[r.name]
        finished = [x for x in recs if x.get("status") == "finished"]
        failed = [x for x in recs if x.get("status") == "failed"]
        metrics = {}
        for m in table.metrics:
            by_seed = {x["_seed"]: get_metric(x, m) for x in finished}
            by_seed = {k: v for k, v in sorted(by_seed.items()) if v is not None}
            st = _stats(list(by_seed.values()))
            st["by_seed"] = by_seed
            key = m.split(".", 1)[1]
            st["published"] = (r.published or {}).get(key)
            metrics[m] = st
        out.append({
            "row": r.name,
            "overrides": r.overrides,
            "reproduce": r.reproduce,
            "optional": r.optional,
            "published": r.published,
            "n_seeds": len(finished),
            "n_failed": len(failed),
            "seeds": sorted(x["_seed"] for x in finished),
            "errors": [f"seed {x['_seed']}: {x.get('error') or 'unknown error'}" for x in failed],
            "metrics": metrics,
            # per IoU type, seed → the TIDE breakdown the run stored (records from before it was stored have none)
            "error_breakdown": {t: {x["_seed"]: x["errors"][t] for x in finished if t in (x.get("errors") or {})}
                                for t in ("bbox", "segm")},
            "schedule": [_schedule(x) for x in finished],
        })
    return out


def _schedule(rec: dict) -> dict:
    """How a run was trained, for the report's "Runs" line: preset, iterations, batch, sizes, what it overrode."""
    cfg = rec.get("config") or {}
    train = cfg.get("train_cfg") or {}
    return {"preset": cfg.get("preset"), "iterations": rec.get("iterations"), "batch": train.get("batch_size"),
            "train_size": train.get("min_size"), "test_size": train.get("test_min_size"),
            "weights_from": bool(rec.get("weights_from"))}


def runs_line(table: PaperTable, rows: list[dict]) -> Optional[str]:
    """One line saying how the finished runs were trained, and the command that trains them again."""
    runs = [s for r in rows for s in r.get("schedule", [])]
    if not runs:
        return None
    trained = [s for s in runs if not s["weights_from"]] or runs
    presets = sorted({str(s["preset"]) for s in trained})
    iters = sorted({s["iterations"] for s in trained if s["iterations"] is not None})
    batch = sorted({s["batch"] for s in trained if s["batch"] is not None})
    sizes = sorted({str(s["train_size"]) for s in trained})
    tests = sorted({s["test_size"] for s in trained if s["test_size"] is not None})
    seeds = max((r["n_seeds"] for r in rows), default=0)
    cmd = f"python -m onestage reproduce {table.id} --preset {presets[0]} --seeds {seeds}"
    if len(iters) == 1:
        cmd += f" --train-set max_iters={iters[0]}"
    return (f"Runs: {len(runs)} finished ({len(runs) - len(trained)} of them evaluate another row's weights); "
            f"preset {', '.join(presets)}; {', '.join(map(str, iters))} iterations of batch "
            f"{', '.join(map(str, batch))}; training size {', '.join(sizes)}, test size {', '.join(map(str, tests))}. "
            f"Again: `{cmd}`.")


def error_attribution(table: PaperTable, rows: list[dict], claims: list[dict]) -> list[str]:
    """Markdown lines: for each claim (a :func:`check_claims` result), how each TIDE error type's ΔAP (the AP it costs) changes from row b to row
    a, mean ± std over the seeds both rows stored a breakdown for. A negative change: row a loses less AP to
    that error type. Empty when no run stored a breakdown."""
    from onestage.analysis.errors import ERROR_TYPES

    by_name = {r["row"]: r for r in rows}
    lines, seen = [], set()
    for c in claims:
        iou = "segm" if c["metric"].startswith("segm") else "bbox"  # the metric check_claims resolved
        if (c["row_a"], c["row_b"], iou) in seen:  # two claims on one pair (AP and APs): one row
            continue
        seen.add((c["row_a"], c["row_b"], iou))
        a = by_name.get(c["row_a"], {}).get("error_breakdown", {}).get(iou, {})
        b = by_name.get(c["row_b"], {}).get("error_breakdown", {}).get(iou, {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        cells = []
        for t in ERROR_TYPES + ("FP", "FN"):
            key = {"FP": "fp_delta_ap", "FN": "fn_delta_ap"}.get(t)
            d = [(a[k][key] if key else a[k]["delta_ap"][t]) - (b[k][key] if key else b[k]["delta_ap"][t])
                 for k in seeds]
            st = _stats(d)
            cells.append(f"{st['mean']:+.1f}" + (f" ± {st['std']:.1f}" if st["std"] is not None else ""))
        lines.append(f"| {c['row_a']} vs {c['row_b']} ({iou}) | {len(seeds)} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = ("| claim rows (a vs b) | seeds | " + " | ".join(ERROR_TYPES) + " | all FPs | all FNs |")
    return ["", "Error attribution (TIDE, arXiv:2008.08115; ΔAP50 each error type costs, row a minus row b; negative: "
                "row a loses less to it):", "", head, "|" + "---|" * (len(ERROR_TYPES) + 4)] + lines


def _claim_metric(table: PaperTable, claim: Claim) -> str:
    return claim.metric or table.metric


def check_claims(table: PaperTable, rows: list[dict]) -> list[dict]:
    """For every ``expect`` claim: our mean difference (row_a − row_b), the paper's, and the verdict.

    ``status``: ``"matches"`` when our difference has the claimed sign ("<", ">") or stays within ``tolerance`` for
    "=", ``"differs"`` otherwise, ``"n/a"`` when either row has no finished run. ``within_noise`` is True when
    |difference| ≤ 2 standard errors of the difference of means (needs ≥ 2 seeds per row; None otherwise).
    ``seed_deltas``: row_a − row_b per seed both rows finished (same seed = same data order, so the spread common
    to both rows cancels); ``seeds_agree``: True when there are ≥ 2 of them and all have the sign of our mean
    difference, False when they disagree, None otherwise.
    """
    by_name = {r["row"]: r for r in rows}
    results = []
    for c in table.expect:
        metric = _claim_metric(table, c)
        a = by_name[c.row_a]["metrics"][metric]
        b = by_name[c.row_b]["metrics"][metric]
        pub_delta = c.published_delta
        if pub_delta is None and a["published"] is not None and b["published"] is not None:
            pub_delta = round(a["published"] - b["published"], 4)
        res = {"claim": c.claim, "row_a": c.row_a, "row_b": c.row_b, "metric": metric, "sign": c.sign,
               "tolerance": c.tolerance if c.sign == "=" else None, "ours_delta": None,
               "published_delta": pub_delta, "status": "n/a", "within_noise": None, "seed_deltas": [],
               "seeds_agree": None}
        if a["mean"] is not None and b["mean"] is not None:
            delta = a["mean"] - b["mean"]
            res["ours_delta"] = delta
            ok = {"<": delta < 0, ">": delta > 0, "=": abs(delta) <= c.tolerance}[c.sign]
            res["status"] = "matches" if ok else "differs"
            if a["n"] >= 2 and b["n"] >= 2:
                se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
                res["within_noise"] = abs(delta) <= 2 * se
            a_seeds, b_seeds = a.get("by_seed") or {}, b.get("by_seed") or {}
            res["seed_deltas"] = [a_seeds[k] - b_seeds[k] for k in sorted(a_seeds) if k in b_seeds]
            if len(res["seed_deltas"]) >= 2:
                res["seeds_agree"] = all(d * delta > 0 for d in res["seed_deltas"])
        results.append(res)
    return results


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _fmt_delta(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:+.1f}"


def _fmt_overrides(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "(baseline)"


def markdown(table: PaperTable, rows: list[dict], claims: list[dict]) -> str:
    """The report as markdown: rows (ours mean ± std vs published), then the claims with their sign check."""
    src = table.source
    primary = table.metric
    others = [m for m in table.metrics if m != primary]
    out = [f"### {table.id}: {table.title}", "",
           f"Source: {src['paper']}, {src['table']} — {src['where']}", "",
           f"Ours: mean ± std over finished seeds; paper numbers in percent. Primary metric: `{primary}`.", ""]
    head = ["row", "overrides", f"ours {primary}", f"paper {primary}", "seeds", "failed"]
    head += [f"{m} ours (paper)" for m in others]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        p = r["metrics"][primary]
        ours = "not reproducible" if not r["reproduce"] else (
            "—" if p["mean"] is None else f"{p['mean']:.1f}" + (f" ± {p['std']:.1f}" if p["std"] is not None else ""))
        cells = [r["row"], _fmt_overrides(r["overrides"]), ours, _fmt(p["published"], 2 if table.kind == "statistics" else 1),
                 str(r["n_seeds"]), str(r["n_failed"])]
        for m in others:
            s = r["metrics"][m]
            cells.append(f"{_fmt(s['mean'])} ({_fmt(s['published'])})")
        out.append("| " + " | ".join(cells) + " |")
    if claims:
        out += ["", "| claim | a − b | metric | ours Δ | paper Δ | sign check | within noise | Δ per seed |",
                "|---|---|---|---|---|---|---|---|"]
        for c in claims:
            sign = c["sign"] + (f" (±{c['tolerance']:g})" if c["sign"] == "=" else "")
            noise = {True: "yes", False: "no", None: "—"}[c["within_noise"]]
            per_seed = " / ".join(_fmt_delta(d) for d in c.get("seed_deltas", [])) or "—"
            agree = {True: " (all seeds agree)", False: " (seeds disagree)", None: ""}[c.get("seeds_agree")]
            out.append(f"| {c['claim']} | {c['row_a']} {sign} {c['row_b']} | {c['metric']} | {_fmt_delta(c['ours_delta'])} "
                       f"| {_fmt_delta(c['published_delta'])} | {c['status']} | {noise} | {per_seed}{agree} |")
    out += error_attribution(table, rows, claims)
    runs = runs_line(table, rows)
    if runs:
        out += ["", runs]
    errors = [(r["row"], e) for r in rows for e in r["errors"]]
    if errors:
        out += ["", "Failed runs:"]
        out += [f"- {row} {e.splitlines()[0][:200]}" for row, e in errors]
    if table.notes:
        out += ["", f"Notes: {table.notes}"]
    return "\n".join(out)


def figure(table: PaperTable, rows: list[dict], metric: Optional[str] = None):
    """Ours (mean ± std, points with error bars) next to the published value (crosses), one x position per row."""
    from matplotlib.figure import Figure

    metric = metric or table.metric
    fig = Figure(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(rows)))
    ours_x, ours_y, ours_e, pub_x, pub_y = [], [], [], [], []
    for x, r in zip(xs, rows):
        s = r["metrics"][metric]
        if s["mean"] is not None:
            ours_x.append(x - 0.1)
            ours_y.append(s["mean"])
            ours_e.append(s["std"] or 0.0)
        if s["published"] is not None:
            pub_x.append(x + 0.1)
            pub_y.append(s["published"])
    ax.errorbar(ours_x, ours_y, yerr=ours_e, fmt="o", capsize=4, color="tab:blue", label="ours (mean ± std)")
    ax.plot(pub_x, pub_y, "x", markersize=9, mew=2, color="tab:red", label="published")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["row"] for r in rows], rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel(metric)
    ax.set_title(f"{table.id}: {metric}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def report(table: Union[PaperTable, str], results_dir: Union[str, Path], figure: bool = False):
    """``(markdown text, Figure or None)`` for ``table`` from the records in ``results_dir``."""
    if not isinstance(table, PaperTable):
        table = load_table(table)
    rows = collect(table, results_dir)
    claims = check_claims(table, rows)
    text = markdown(table, rows, claims)
    fig = _figure(table, rows) if figure else None
    return text, fig


_figure = figure  # ``report`` has a parameter named ``figure``


def csv_text(table: PaperTable, rows: list[dict]) -> str:
    """One CSV line per row: seeds, failures, and for every metric ours (mean, std) beside the published value."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["row", "n_seeds", "n_failed"]
    for m in table.metrics:
        header += [f"{m}.mean", f"{m}.std", f"{m}.published"]
    writer.writerow(header)
    blank = lambda v: "" if v is None else v  # noqa: E731
    for r in rows:
        line = [r["row"], r["n_seeds"], r["n_failed"]]
        for m in table.metrics:
            s = r["metrics"][m]
            line += [blank(s["mean"]), blank(s["std"]), blank(s["published"])]
        writer.writerow(line)
    return buf.getvalue()


def write_report(table: Union[PaperTable, str], results_dir: Union[str, Path]) -> dict:
    """Write ``REPORT.md``, ``report.csv`` and ``report.png`` next to the records in ``results_dir`` (atomically);
    returns their paths. This is what ``python -m onestage reproduce TABLE --report`` leaves behind."""
    import os

    if not isinstance(table, PaperTable):
        table = load_table(table)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(table, results_dir)
    claims = check_claims(table, rows)
    paths = {"markdown": results_dir / "REPORT.md", "csv": results_dir / "report.csv",
             "figure": results_dir / "report.png"}
    for key, text in (("markdown", markdown(table, rows, claims) + "\n"), ("csv", csv_text(table, rows))):
        tmp = paths[key].with_suffix(paths[key].suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
    fig = _figure(table, rows)
    tmp = results_dir / "report.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, paths["figure"])
    return paths
