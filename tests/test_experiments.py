"""Reproduction machinery: paper-table files, the papermill sweep runner, the aggregator, the experiment notebook.

The runner is exercised on a tiny dummy notebook (written into tmp_path) so these tests do not depend on any model
training: one row is made to fail, and the tests check that its failure is recorded, the sweep goes on, a rerun skips
what finished, and unknown parameter names stop everything before a kernel starts.
"""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import nbformat
import pytest

from onestage.experiments import aggregate, runner
from onestage.experiments.records import iter_records, read_record, record_path, write_json_atomic
from onestage.experiments.tables import TableError, list_tables, load_table, validate_table
from sweep_helpers import DUMMY_BODY, DUMMY_PARAMS, minimal_table, slow_sweep, write_notebook

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_NB = REPO / "notebooks" / "experiment.ipynb"


# ------------------------------------------------------------------------------------------------------ tables
def test_every_paper_table_validates_and_sources_its_numbers():
    ids = list_tables()
    expected = {"fcos_centerness", "fcos_ambiguity_bpr", "condinst_table1", "condinst_table2", "condinst_table3",
                "condinst_table4", "condinst_table5", "solo_grid_fpn", "solo_coordconv", "solo_decoupled",
                "solo_nms", "blendmask_table1", "blendmask_table2", "blendmask_table3", "blendmask_table5",
                "blendmask_table6"}
    assert expected <= set(ids)
    for tid in ids:
        t = load_table(tid)
        assert t.id == tid and t.source["paper"] and t.source["where"]
        for c in t.expect:  # claims only name rows that exist (validate_table checks; this guards the guard)
            assert {c.row_a, c.row_b} <= set(t.row_names())


def test_paper_numbers_match_the_seed_text():
    """Spot-check transcription against the seed lecture's CondInst tables."""
    t1 = load_table("condinst_table1")
    assert t1.row("depth=1").published["AP"] == 30.9
    assert t1.row("width=2").published["APl"] == 49.1
    t3 = load_table("condinst_table3")
    assert t3.row("fmask_only").published["AP"] == 31.4  # "without the relative coordinates ... 31.4"
    assert t3.row("rel_coords_only").overrides == {"rel_coords": "coords_only"}
    assert load_table("condinst_table4").row("factor=2").published["APs"] == 17.0
    fc = load_table("fcos_centerness")
    assert [fc.row(n).published["AP"] for n in ("none", "cls", "reg")] == [33.5, 37.1, 37.4]
    assert not fc.row("computed").optional and "computed" in [r.name for r in fc.runnable_rows()]


def test_invalid_table_lists_every_problem():
    bad = minimal_table(metric="AP", source={"paper": "P"},
                         rows=[{"name": "a b", "overrides": {}, "published": {}},
                               {"name": "c", "published": {"AP": "high"}}],
                         expect=[{"claim": "x", "row_a": "a", "row_b": "zzz", "sign": "<<"}])
    with pytest.raises(TableError) as e:
        validate_table(bad, "bad.json")
    msg = str(e.value)
    for fragment in ("bad.json", "'<section>.<name>'", "source.table", "'a b'", "'overrides' must be an object",
                     "must be a number", "unknown row 'zzz'", "sign must be one of"):
        assert fragment in msg, fragment
    assert validate_table(minimal_table()).row("b").overrides == {"x": 1}


def test_table_id_must_match_file_name(tmp_path):
    p = tmp_path / "other.json"
    p.write_text(json.dumps(minimal_table()))
    with pytest.raises(TableError, match="named 'other'"):
        load_table(p)


def test_statistics_table_is_computed_without_a_notebook(tmp_path, capsys):
    # two overlapping boxes of different classes on a 400×400 image, resized ×2 to 800: ambiguous without FPN only
    ann = {"images": [{"id": 1, "width": 400, "height": 400}],
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 1e4},
                           {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 40, 20, 20], "area": 400}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    out = tmp_path / "out"
    assert runner.main(["fcos_ambiguity_bpr", "--data", f"coco:{path}", "--out", str(out), "--no-progress"]) == 0
    table = load_table("fcos_ambiguity_bpr")
    recs = {row: rec for row, _, rec in iter_records(out / table.id)}
    assert set(recs) == {r.name for r in table.rows}
    p4, fpn = recs["fcos_P4_only"]["metrics"]["stats"], recs["fcos_fpn"]["metrics"]["stats"]
    assert p4["amb_ratio"] > 0 and p4["amb_ratio_diff"] == p4["amb_ratio"]  # the two boxes differ in class
    assert fpn["amb_ratio"] == 0 and fpn["BPR"] == 100
    assert "amb_ratio" not in recs["retinanet_lq_none"]["metrics"]["stats"]  # undefined for anchors
    assert "fcos_P4_only" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ runner
@pytest.fixture
def dummy(tmp_path):
    table = minimal_table(id="dummy", rows=[{"name": "good", "overrides": {"x": 1}, "published": {"AP": 5.0}},
                                             {"name": "bad", "overrides": {"explode": True}, "published": None}],
                           expect=[{"claim": "bad below good", "row_a": "bad", "row_b": "good", "sign": "<"}])
    table_path = tmp_path / "dummy.json"
    table_path.write_text(json.dumps(table))
    nb = write_notebook(tmp_path / "dummy.ipynb", DUMMY_PARAMS, DUMMY_BODY)
    return table_path, nb, tmp_path / "out"


def test_runner_records_failures_goes_on_and_resumes(dummy, capsys):
    table_path, nb, out = dummy
    argv = [str(table_path), "--notebook", str(nb), "--out", str(out), "--seeds", "2", "--workers", "2",
            "--timeout", "60", "--no-progress"]
    assert runner.main(argv) == 1  # some runs failed

    for seed in (0, 1):
        good = read_record(record_path(out, "dummy", "good", seed))
        assert good["status"] == "finished" and good["metrics"]["bbox"]["AP"] == 10.0 + seed
        assert good["row"] == "good" and Path(good["executed_notebook"]).exists()
        bad = read_record(record_path(out, "dummy", "bad", seed))
        assert bad["status"] == "failed"
        assert "RuntimeError: boom" in bad["error"] and "boom" in bad["traceback"]
        assert bad["parameters"]["overrides"] == {"explode": True}
    shown = capsys.readouterr().out
    assert "| bad | 0 | failed |" in shown and "RuntimeError: boom" in shown

    # Rerun: finished runs are skipped (files untouched), failed ones are retried.
    good0 = record_path(out, "dummy", "good", 0)
    before = good0.stat().st_mtime_ns
    table = load_table(table_path)
    jobs = runner.plan_runs(table, seeds=2, out=out, notebook=nb, timeout=60)
    summaries, interrupted = runner.run_jobs(jobs, workers=2, progress=False)
    status = {(s["row"], s["seed"]): s["status"] for s in summaries}
    assert not interrupted
    assert status == {("good", 0): "skipped", ("good", 1): "skipped", ("bad", 0): "failed", ("bad", 1): "failed"}
    assert good0.stat().st_mtime_ns == before


def test_ray_executor_without_ray_says_how_to_install_it(dummy, capsys, monkeypatch):
    import sys

    table_path, nb, out = dummy
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where the extra is missing
    assert runner.main([str(table_path), "--notebook", str(nb), "--out", str(out), "--no-progress",
                        "--executor", "ray"]) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err
    assert not list(out.glob("*/*.json"))  # nothing ran


def test_unknown_parameter_names_are_rejected_before_launch(dummy, capsys):
    table_path, _, out = dummy
    tmp = table_path.parent
    nb = write_notebook(tmp / "lacks_quick.ipynb", DUMMY_PARAMS.replace("quick = False", "fast = False"), DUMMY_BODY)
    with pytest.raises(runner.ParameterError, match=r"\['quick'\]"):
        runner.validate_parameters(nb, runner.RUNNER_PARAMETERS)
    assert runner.main([str(table_path), "--notebook", str(nb), "--out", str(out), "--no-progress"]) == 2
    assert "not declared" in capsys.readouterr().err
    assert not out.exists()  # nothing launched, nothing written
    no_params = write_notebook(tmp / "no_params.ipynb", "", DUMMY_BODY)
    with pytest.raises(runner.ParameterError, match="no cell tagged 'parameters'"):
        runner.validate_parameters(no_params, ["seed"])


def test_plan_merges_baseline_and_row_overrides(tmp_path):
    t = load_table("condinst_table1")
    jobs = runner.plan_runs(t, seeds=2, out=tmp_path, rows=["depth=1"], preset="smoke", data="synthetic:/d")
    assert [(j["row"], j["seed"]) for j in jobs] == [("depth=1", 0), ("depth=1", 1)]
    p = jobs[1]["parameters"]
    assert set(p) == set(runner.RUNNER_PARAMETERS)
    assert p["overrides"]["mask_head_depth"] == 1 and p["overrides"]["mask_head_width"] == 8
    assert p["record_path"] == str(tmp_path.resolve() / "condinst_table1" / "depth=1__seed1.json")
    with pytest.raises(KeyError):
        runner.plan_runs(t, out=tmp_path, rows=["depth=9"])


def test_tuple_train_overrides_reach_the_notebook_as_lists_and_the_config_as_tuples(tmp_path):
    from onestage.config import get_train_config

    sets = runner.parse_train_set(["min_size=(256, 288)", "max_iters=5"])
    jobs = runner.plan_runs(load_table("condinst_table4"), out=tmp_path, rows=["factor=1"], train_overrides=sets)
    assert jobs[0]["parameters"]["train_overrides"] == {"min_size": [256, 288], "max_iters": 5}
    assert get_train_config("cpu", min_size=[256, 288]).min_size == (256, 288)


def test_identical_configs_across_tables_share_one_run(tmp_path):
    """CondInst's baseline is a row of all five tables: it is trained once per seed and its record reused."""
    t1, t4 = load_table("condinst_table1"), load_table("condinst_table4")
    base1 = runner.plan_runs(t1, seeds=2, out=tmp_path, rows=["depth=3", "depth=1"], preset="smoke")
    base4 = runner.plan_runs(t4, seeds=2, out=tmp_path, rows=["factor=4"], preset="smoke")
    keys1 = {(j["row"], j["seed"]): j["config_key"] for j in base1}
    assert keys1[("depth=3", 0)] == base4[0]["config_key"] and keys1[("depth=3", 1)] == base4[1]["config_key"]
    assert keys1[("depth=1", 0)] != keys1[("depth=3", 0)] != keys1[("depth=3", 1)]
    other = runner.plan_runs(t4, seeds=1, out=tmp_path, rows=["factor=4"], preset="smoke",
                             train_overrides={"max_iters": 7})
    assert other[0]["config_key"] != base4[0]["config_key"]  # a different schedule is a different run
    done = next(j for j in base1 if j["row"] == "depth=3" and j["seed"] == 0)
    write_json_atomic(done["record_path"], {"status": "finished", "config_key": done["config_key"],
                                            "metrics": {"segm": {"AP": 12.5}}})
    summaries, _ = runner.run_jobs(base4[:1], workers=1, progress=False)
    assert summaries == [{"row": "factor=4", "seed": 0, "status": "shared", "error": None, "seconds": 0.0}]
    shared = read_record(base4[0]["record_path"])
    assert shared["metrics"]["segm"]["AP"] == 12.5 and shared["row"] == "factor=4" and shared["table"] == t4.id
    assert shared["shared_from"] == done["record_path"]


def test_rows_that_change_inference_only_evaluate_the_source_rows_weights(tmp_path):
    """FCOS center-ness 'computed' trains as 'none'; SOLO's NMS kinds train alike: one training per seed."""
    fc = load_table("fcos_centerness")
    jobs = runner.plan_runs(fc, seeds=2, out=tmp_path, preset="smoke")
    by = {(j["row"], j["seed"]): j for j in jobs}
    for seed in (0, 1):
        comp, none = by[("computed", seed)], by[("none", seed)]
        assert comp["train_key"] == none["train_key"] and comp["config_key"] != none["config_key"]
        assert comp["parameters"]["weights_from"] == none["parameters"]["out_dir"]
        assert comp["weights_source"] == none["record_path"]
        for row in ("none", "cls", "reg"):
            assert by[(row, seed)]["parameters"]["weights_from"] == "" and "weights_source" not in by[(row, seed)]
    assert [j["row"] for j in jobs][-2:] == ["computed", "computed"]  # after every source
    assert len({by[(r, 0)]["train_key"] for r in ("none", "cls", "reg")}) == 3
    nms = runner.plan_runs(load_table("solo_nms"), seeds=1, out=tmp_path, preset="smoke")
    assert [(j["row"], bool(j["parameters"]["weights_from"])) for j in nms] == [("mask_nms", False),
                                                                              ("matrix_nms", True)]
    # --rows computed alone: no finished source → it trains itself; once 'none' finished with a final.pt, it is used
    alone = runner.plan_runs(fc, seeds=1, out=tmp_path, preset="smoke", rows=["computed"])
    assert alone[0]["parameters"]["weights_from"] == ""
    none0 = by[("none", 0)]
    write_json_atomic(none0["record_path"], {"status": "finished", "metrics": {}})
    Path(none0["parameters"]["out_dir"]).mkdir(parents=True)
    (Path(none0["parameters"]["out_dir"]) / "final.pt").write_bytes(b"")
    alone = runner.plan_runs(fc, seeds=1, out=tmp_path, preset="smoke", rows=["computed"])
    assert alone[0]["parameters"]["weights_from"] == none0["parameters"]["out_dir"]


def test_a_row_evaluating_a_shared_baseline_reads_the_weights_of_the_run_it_was_shared_from(tmp_path):
    """CondInst Table 5's mask-NMS row evaluates the baseline's weights; when the baseline row is a record shared
    from Table 4's identical run (only the JSON is copied), the weights are read from Table 4's run folder."""
    nb = write_notebook(tmp_path / "echo.ipynb", DUMMY_PARAMS,
                        "from onestage.experiments.records import write_json_atomic\n"
                        "write_json_atomic(record_path, {'status': 'finished', 'weights_from': weights_from})")
    out = tmp_path / "out"
    t4 = runner.plan_runs(load_table("condinst_table4"), seeds=1, out=out, rows=["factor=4"], preset="smoke",
                          notebook=nb)[0]
    t5 = runner.plan_runs(load_table("condinst_table5"), seeds=1, out=out, preset="smoke", notebook=nb)
    box, mask = t5
    assert (box["row"], mask["row"]) == ("box_nms", "mask_nms") and box["config_key"] == t4["config_key"]
    assert mask["parameters"]["weights_from"] == box["parameters"]["out_dir"]  # as planned: T5's own folder
    write_json_atomic(t4["record_path"], {"status": "finished", "config_key": t4["config_key"], "metrics": {}})
    Path(t4["parameters"]["out_dir"]).mkdir(parents=True)
    (Path(t4["parameters"]["out_dir"]) / "final.pt").write_bytes(b"")
    summaries, _ = runner.run_jobs(t5, workers=1, progress=False)
    assert [s["status"] for s in summaries] == ["shared", "finished"]
    assert not Path(box["parameters"]["out_dir"]).exists()
    assert read_record(mask["record_path"])["weights_from"] == t4["parameters"]["out_dir"]
    assert runner.trained_weights_dir(box["record_path"], box["cwd"]) == Path(t4["parameters"]["out_dir"])
    # planned again with --rows mask_nms (its source outside the plan): the shared record leads to Table 4's weights
    again = runner.plan_runs(load_table("condinst_table5"), seeds=1, out=out, preset="smoke", rows=["mask_nms"],
                             notebook=nb)
    assert again[0]["parameters"]["weights_from"] == t4["parameters"]["out_dir"]


def test_records_name_paths_relative_to_the_repository():
    from onestage.experiments.records import repo_relative

    root = REPO
    rec = {"executed_notebook": str(root / "runs" / "reproduce" / "t" / "a__seed0.ipynb"), "n": 3,
           "parameters": {"out_dir": str(root / "runs" / "x"), "data": "synthetic", "elsewhere": "/opt/data/a.json"},
           "list": [str(root / "data" / "y.json"), None], "near_miss": str(root) + "-other/z"}
    out = repo_relative(rec, root)
    assert out == {"executed_notebook": "runs/reproduce/t/a__seed0.ipynb", "n": 3,
                   "parameters": {"out_dir": "runs/x", "data": "synthetic", "elsewhere": "/opt/data/a.json"},
                   "list": ["data/y.json", None], "near_miss": str(root) + "-other/z"}


def test_a_row_whose_weight_source_failed_fails_with_the_reason(dummy):
    table_path, nb, out = dummy
    jobs = runner.plan_runs(load_table(table_path), seeds=1, out=out, notebook=nb, timeout=60)
    bad = next(j for j in jobs if j["row"] == "bad")
    good = next(j for j in jobs if j["row"] == "good")
    good["weights_source"] = bad["record_path"]  # as if 'good' evaluated the weights 'bad' trains
    summaries, _ = runner.run_jobs([good, bad], workers=2, progress=False)  # 'good' must wait for 'bad'
    status = {s["row"]: s for s in summaries}
    assert status["bad"]["status"] == "failed" and status["good"]["status"] == "failed"
    assert "did not finish" in status["good"]["error"] and bad["record_path"] in status["good"]["error"]
    assert read_record(good["record_path"])["weights_source"] == bad["record_path"]


def test_load_trained_weights_accepts_inference_changes_only(tmp_path):
    import torch

    import onestage
    from onestage.data.synthetic import ensure_synthetic
    from onestage.config import get_train_config
    from onestage.data import datasets_for_config
    from onestage.engine.train import train
    from onestage.experiments.experiment import load_trained_weights

    root = tmp_path / "data"
    ensure_synthetic(root, num_train=4, num_val=2, progress=False)
    cfg = get_train_config("smoke", max_iters=2, checkpoint_every=2)
    train_set, _ = datasets_for_config(f"synthetic:{root}", cfg, model="fcos")
    torch.manual_seed(0)
    src = onestage.build_model("fcos", preset="smoke", num_classes=train_set.num_classes, centerness_on="none")
    train(src, train_set, cfg, tmp_path / "run", progress=False)
    comp = onestage.build_model("fcos", preset="smoke", num_classes=train_set.num_classes, centerness_on="computed",
                                score_thresh=0.2)
    summary = load_trained_weights(comp, tmp_path / "run")
    assert summary["iterations"] == 2
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), comp.state_dict().values()))
    cls = onestage.build_model("fcos", preset="smoke", num_classes=train_set.num_classes, centerness_on="cls")
    with pytest.raises(ValueError, match="centerness_on"):
        load_trained_weights(cls, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="final.pt"):
        load_trained_weights(comp, tmp_path)


# ------------------------------------------------------------------------------------------------------ aggregate
def test_aggregate_mean_std_and_sign_checks(tmp_path):
    table = validate_table(minimal_table(
        id="agg", metrics=["bbox.AP", "bbox.AP50"],
        rows=[{"name": "a", "overrides": {}, "published": {"AP": 30.0, "AP50": 50.0}},
              {"name": "b", "overrides": {"x": 1}, "published": {"AP": 35.0}},
              {"name": "c", "overrides": {"x": 2}, "published": None},
              {"name": "d", "overrides": {"x": 3}, "published": None}],
        expect=[{"claim": "a below b", "row_a": "a", "row_b": "b", "sign": "<"},
                {"claim": "a above b (wrong on purpose)", "row_a": "a", "row_b": "b", "sign": ">"},
                {"claim": "c equals a", "row_a": "c", "row_b": "a", "sign": "=", "tolerance": 0.5,
                 "published_delta": 0.0},
                {"claim": "d never ran", "row_a": "d", "row_b": "a", "sign": "<"}]))
    d = tmp_path / "agg"

    def rec(row, seed, ap, status="finished"):
        body = {"status": status, "metrics": {"bbox": {"AP": ap, "AP50": ap + 20}}} if status == "finished" \
            else {"status": "failed", "error": "ValueError: nope"}
        write_json_atomic(d / f"{row}__seed{seed}.json", body)

    for s, ap in enumerate([10.0, 12.0, 14.0]):
        rec("a", s, ap)
    for s, ap in enumerate([20.0, 21.0]):
        rec("b", s, ap)
    rec("b", 2, None, status="failed")
    rec("c", 0, 12.3)
    rec("zzz", 0, 1.0)  # a row the table does not know: ignored

    rows = aggregate.collect(table, d)
    a, b, c, dd = rows
    assert a["metrics"]["bbox.AP"]["mean"] == pytest.approx(12.0)
    assert a["metrics"]["bbox.AP"]["std"] == pytest.approx(2.0)  # sample std of 10, 12, 14
    assert a["metrics"]["bbox.AP50"]["published"] == 50.0
    assert (b["n_seeds"], b["n_failed"]) == (2, 1) and "ValueError: nope" in b["errors"][0]
    assert c["metrics"]["bbox.AP"]["std"] is None and dd["n_seeds"] == 0

    claims = aggregate.check_claims(table, rows)
    assert [x["status"] for x in claims] == ["matches", "differs", "matches", "n/a"]
    assert claims[0]["ours_delta"] == pytest.approx(-8.5) and claims[0]["published_delta"] == -5.0
    # -8.5 against a standard error of sqrt(4/3 + 0.5/2) ≈ 1.26: well outside the noise
    assert claims[0]["within_noise"] is False and claims[2]["within_noise"] is None
    # paired by seed: a − b for seeds 0 and 1 (b's seed 2 failed); c has one seed, so no verdict
    assert claims[0]["seed_deltas"] == pytest.approx([-10.0, -9.0]) and claims[0]["seeds_agree"] is True
    assert claims[2]["seed_deltas"] == pytest.approx([2.3]) and claims[2]["seeds_agree"] is None
    assert claims[3]["seed_deltas"] == [] and claims[3]["seeds_agree"] is None

    text, fig = aggregate.report(table, d, figure=True)
    assert "| a | (baseline) | 12.0 ± 2.0 | 30.0 | 3 | 0 |" in text
    assert "| a below b | a < b | bbox.AP | -8.5 | -5.0 | matches | no | -10.0 / -9.0 (all seeds agree) |" in text
    assert "b seed 2: ValueError: nope" in text
    assert type(fig).__name__ == "Figure" and fig.axes[0].get_ylabel() == "bbox.AP"
    assert math.isclose(fig.axes[0].lines[-1].get_ydata()[0], 30.0)  # the published marker of row a


def test_claims_pair_runs_by_seed(tmp_path):
    """A common seed effect (seed 1 is 5 points better in both rows) hides a consistent +0.5 from the unpaired
    noise test; the per-seed differences show it. Disagreeing seeds are called so."""
    table = validate_table(minimal_table(
        id="paired", metric="segm.AP", metrics=["segm.AP"],
        rows=[{"name": "base", "overrides": {}, "published": None},
              {"name": "up", "overrides": {"x": 1}, "published": None},
              {"name": "mixed", "overrides": {"x": 2}, "published": None}],
        expect=[{"claim": "up above base", "row_a": "up", "row_b": "base", "sign": ">"},
                {"claim": "mixed above base", "row_a": "mixed", "row_b": "base", "sign": ">"}]))
    d = tmp_path / "paired"
    for row, aps in {"base": [10.0, 15.0], "up": [10.5, 15.5], "mixed": [11.0, 14.8]}.items():
        for seed, ap in enumerate(aps):
            write_json_atomic(d / f"{row}__seed{seed}.json", {"status": "finished", "metrics": {"segm": {"AP": ap}}})
    up, mixed = aggregate.check_claims(table, aggregate.collect(table, d))
    assert up["within_noise"] is True and up["seeds_agree"] is True
    assert up["seed_deltas"] == pytest.approx([0.5, 0.5])
    assert mixed["seed_deltas"] == pytest.approx([1.0, -0.2]) and mixed["seeds_agree"] is False
    text = aggregate.markdown(table, aggregate.collect(table, d), [up, mixed])
    assert "| +0.5 / +0.5 (all seeds agree) |" in text and "| +1.0 / -0.2 (seeds disagree) |" in text


def test_report_cli_reads_results_dir(tmp_path, capsys):
    d = tmp_path / "committed"
    write_json_atomic(d / "none__seed0.json", {"status": "finished", "metrics": {"bbox": {"AP": 1.0}}})
    write_json_atomic(d / "cls__seed0.json", {"status": "finished", "metrics": {"bbox": {"AP": 3.0}}})
    fig_path = tmp_path / "fig.png"
    assert runner.main(["fcos_centerness", "--report", "--results-dir", str(d), "--figure", str(fig_path)]) == 0
    out = capsys.readouterr().out
    assert "| the center-ness branch boosts AP a lot (33.5 -> 37.1) | none < cls | bbox.AP | -2.0 | -3.6 | matches" in out
    assert fig_path.stat().st_size > 0
    # the report is also left next to the records: markdown, CSV (ours beside published) and the figure
    assert "| none |" in (d / "REPORT.md").read_text()
    lines = (d / "report.csv").read_text().splitlines()
    assert lines[0].startswith("row,n_seeds,n_failed,bbox.AP.mean,bbox.AP.std,bbox.AP.published")
    assert lines[1].startswith("none,1,0,1.0,,33.5")
    assert (d / "report.png").stat().st_size > 0


def test_cost_metrics_are_read_from_the_record_cost_section(tmp_path):
    table = validate_table(minimal_table(
        id="cost", metric="segm.AP", metrics=["segm.AP", "cost.head_output_mib"],
        rows=[{"name": "vanilla", "overrides": {}, "published": None},
              {"name": "decoupled", "overrides": {"x": 1}, "published": None}],
        expect=[{"claim": "decoupled needs less head memory", "row_a": "decoupled", "row_b": "vanilla",
                 "sign": "<", "metric": "cost.head_output_mib"}]))
    d = tmp_path / "cost"
    for seed in (0, 1):
        write_json_atomic(d / f"vanilla__seed{seed}.json", {"status": "finished", "metrics": {"segm": {"AP": 5.0}},
                                                            "cost": {"head_output_mib": 40.0 + seed}})
        write_json_atomic(d / f"decoupled__seed{seed}.json", {"status": "finished", "metrics": {"segm": {"AP": 5.5}},
                                                              "cost": {"head_output_mib": 2.0}})
    rows = aggregate.collect(table, d)
    assert rows[0]["metrics"]["cost.head_output_mib"]["mean"] == pytest.approx(40.5)
    (claim,) = aggregate.check_claims(table, rows)
    assert claim["status"] == "matches" and claim["ours_delta"] == pytest.approx(-38.5)
    # a record without the section (older runs) just has no value
    assert aggregate.get_metric({"metrics": {"segm": {"AP": 1.0}}}, "cost.inference_ms") is None


def test_head_output_memory_is_measured_and_matches_the_solo_shapes():
    """The hook-measured head output of a smoke SOLO at 128×128 equals the analytic mask-branch shapes (S² maps per
    level vanilla, S + S decoupled) plus the S×S×C category maps."""
    import torch

    import onestage
    from onestage.experiments.experiment import head_output_mib
    from onestage.analysis.solo_memory import mask_branch_memory
    from onestage.modeling.solo import PAPER_GRIDS, PAPER_STRIDES

    image = torch.rand(3, 128, 128)
    analytic = mask_branch_memory(PAPER_GRIDS, PAPER_STRIDES, image_hw=(128, 128))
    cate_bytes = 4 * 3 * sum(s * s for s in PAPER_GRIDS)
    for head in ("vanilla", "decoupled"):
        torch.manual_seed(0)
        net = onestage.build_model("solo", preset="smoke", num_classes=3, head=head)
        assert head_output_mib(net, image) == pytest.approx((analytic[head] + cate_bytes) / 2**20)
        assert net.training  # the measurement leaves the mode as it found it
    assert head_output_mib(torch.nn.Linear(2, 2), image) is None  # no head sub-module: not measurable


# ------------------------------------------------------------------------------------------------------ notebook
def test_experiment_notebook_parameters_are_literals_and_match_the_runner():
    nb = nbformat.read(EXPERIMENT_NB, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert nb.cells.index(tagged[0]) == next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    names = []
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
        ast.literal_eval(stmt.value)  # raises on anything but a literal
        names.append(stmt.targets[0].id)
    assert sorted(names) == sorted(runner.RUNNER_PARAMETERS + runner.OPTIONAL_RUNNER_PARAMETERS)
    # papermill's own parser must see every one of them too (it silently drops lines it cannot parse)
    import papermill

    assert set(papermill.inspect_notebook(str(EXPERIMENT_NB))) == set(runner.RUNNER_PARAMETERS
                                                                       + runner.OPTIONAL_RUNNER_PARAMETERS)


def _engine_ready() -> bool:
    try:
        from onestage.data import get_dataset  # noqa: F401
        from onestage.engine.train import train  # noqa: F401
        from onestage.modeling.fcos import FCOS  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _engine_ready(), reason="data/engine/model code has not landed yet")
def test_experiment_notebook_runs_quick(tmp_path):
    import papermill

    rec = tmp_path / "record.json"
    papermill.execute_notebook(str(EXPERIMENT_NB), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               parameters={"quick": True, "out_dir": str(tmp_path / "run"), "record_path": str(rec),
                                           "overrides": {"centerness_on": "cls"}},
                               execution_timeout=300, progress_bar=False, cwd=str(REPO))
    r = json.loads(rec.read_text())
    assert r["status"] == "finished" and r["config"]["effective_preset"] == "smoke"
    assert r["config"]["model_cfg"]["centerness_on"] == "cls"
    assert set(r["metrics"]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert r["iterations"] > 0 and r["inference_ms_per_image"] > 0
    assert r["cost"]["inference_ms"] == r["inference_ms_per_image"] and r["cost"]["params_M"] > 0
    assert r["cost"]["head_output_mib"] > 0
    assert {"python", "torch", "torchvision", "onestage"} <= set(r["versions"])
    assert set(r["errors"]["bbox"]["delta_ap"]) == {"cls", "loc", "both", "dupe", "bkg", "miss"}  # TIDE breakdown
    # a record from before runs stored it: --backfill-errors re-evaluates the run's weights to the same numbers
    from onestage.experiments.experiment import backfill_errors

    stored = r.pop("errors")
    rec.write_text(json.dumps(r))
    again = backfill_errors(rec, tmp_path / "run")
    assert again["errors"] == stored and again["errors_backfilled"]["from"].endswith("final.pt")
    assert backfill_errors(rec, tmp_path / "run") is None  # already has one


def test_a_run_can_be_one_ddp_training(tmp_path):
    """``nproc_per_node`` > 1 (``reproduce --nproc-per-run``): the notebook trains through torchrun (2 gloo processes
    here) with exactly its configuration, then evaluates the weights; the plan passes the parameter only then."""
    import papermill

    rec = tmp_path / "record.json"
    papermill.execute_notebook(str(EXPERIMENT_NB), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               parameters={"quick": True, "out_dir": str(tmp_path / "run"), "record_path": str(rec),
                                           "nproc_per_node": 2, "train_overrides": {"max_iters": 3}},
                               execution_timeout=600, progress_bar=False, cwd=str(REPO))
    r = json.loads(rec.read_text())
    assert r["status"] == "finished" and r["iterations"] == 3
    assert set(r["metrics"]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    trained = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert trained["world_size"] == 2
    assert json.loads(json.dumps(trained["train_cfg"])) == json.loads(json.dumps(r["config"]["train_cfg"]))
    table = load_table("fcos_centerness")
    one, two = (runner.plan_runs(table, seeds=1, out=tmp_path, nproc_per_run=n)[0] for n in (1, 2))
    assert "nproc_per_node" not in one["parameters"] and two["parameters"]["nproc_per_node"] == 2
    assert one["config_key"] != two["config_key"]  # a distributed run is another run


def test_train_set_overrides_are_parsed_checked_and_reach_every_job(tmp_path):
    from onestage.experiments.runner import parse_train_set, plan_runs
    from onestage.experiments.tables import TableError, load_table

    assert parse_train_set(["max_iters=300", "time_budget_s=None", "optimizer=sgd"]) == {
        "max_iters": 300, "time_budget_s": None, "optimizer": "sgd"}
    with pytest.raises(TableError):
        parse_train_set(["max_iter=300"])  # typo: not a TrainConfig field
    table = load_table("fcos_centerness")
    jobs = plan_runs(table, seeds=2, out=tmp_path, train_overrides={"max_iters": 7})
    assert len(jobs) == 2 * len(table.runnable_rows(None))
    assert all(j["parameters"]["train_overrides"]["max_iters"] == 7 for j in jobs)


def test_sweep_killed_with_sigkill_resumes_without_redoing_finished_rows(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    table_path, nb, out = slow_sweep(tmp_path, "killme")
    (out / "killme" / "SLOW").touch()
    argv = [sys.executable, "-m", "onestage", "reproduce", str(table_path), "--notebook", str(nb), "--out", str(out),
            "--timeout", "300", "--no-progress"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = record_path(out, "killme", "first", 0)
    log = out / "killme" / "executions.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (first.exists() and log.exists() and "2" in log.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, its workers and the kernels, mid-run
    proc.wait()
    assert read_record(first)["status"] == "finished"
    assert read_record(record_path(out, "killme", "second", 0)) is None

    (out / "killme" / "SLOW").unlink()
    assert runner.main([str(table_path), "--notebook", str(nb), "--out", str(out), "--no-progress"]) == 0
    assert log.read_text().split() == ["1", "2", "2"]  # "first" ran once; "second" was redone after the kill
    assert read_record(record_path(out, "killme", "second", 0))["metrics"]["bbox"]["AP"] == 2.0


def test_workers_and_kernels_die_with_a_killed_driver(tmp_path):
    """Issue 21 item 10: SIGKILL of the driver alone (not its process group) used to leave its pool worker (and
    the kernel under it) training the row; a rerun started at once trained the same row beside them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    table_path, nb, out = slow_sweep(tmp_path, "orphans")
    (out / "orphans" / "SLOW").touch()
    argv = [sys.executable, "-m", "onestage", "reproduce", str(table_path), "--notebook", str(nb), "--out", str(out),
            "--timeout", "300", "--no-progress"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "orphans" / "executions.log"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (log.exists() and "2" in log.read_text()):
            time.sleep(0.2)
        assert log.exists() and "2" in log.read_text(), "the slow row never started"
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert descendants  # the pool worker, its kernel, the resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(descendants, timeout=20)
        assert not alive, [p.cmdline()[:3] for p in alive]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert read_record(record_path(out, "orphans", "second", 0)) is None


def test_a_ray_task_ends_with_its_driver_on_the_same_machine():
    """executors.end_with_driver: a worker exits within seconds of its driver's SIGKILL (a sleeping process stands
    in for the driver) and not while the driver lives; a driver on another host is left to Ray's own cleanup."""
    import subprocess
    import sys
    import time

    code = ("import socket, sys, time\n"
            "from onestage.experiments.executors import end_with_driver\n"
            "host = socket.gethostname() if sys.argv[2] == 'here' else 'elsewhere.invalid'\n"
            "with end_with_driver({'pid': int(sys.argv[1]), 'host': host}, interval=0.1):\n"
            "    time.sleep(float(sys.argv[3]))\n"
            "print('ran to the end')\n")

    def worker(host: str, seconds: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code, str(driver.pid), host, str(seconds)],
                                stdout=subprocess.PIPE, text=True)

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert worker("here", 2).communicate(timeout=60)[0].strip() == "ran to the end"  # the driver lived on
        elsewhere, orphan = worker("there", 8), worker("here", 120)
        time.sleep(4.0)  # both imported and polling
        driver.kill()
        driver.wait()  # reaped; a zombie counts as gone too
        t0 = time.time()
        assert orphan.communicate(timeout=30)[0] == "" and orphan.returncode == 1
        assert time.time() - t0 < 10
        assert elsewhere.communicate(timeout=60)[0].strip() == "ran to the end"
    finally:
        driver.kill()
        driver.wait()


def test_a_run_locked_by_another_process_is_left_alone_and_reported(tmp_path, capsys):
    table_path, nb, out = slow_sweep(tmp_path, "busy")
    second = record_path(out, "busy", "second", 0)
    with runner.run_lock(second) as mine:
        assert mine
        with runner.run_lock(second) as again:  # flock: a second open file description does not get it either
            assert not again
        assert runner.main([str(table_path), "--notebook", str(nb), "--out", str(out), "--no-progress"]) == 1
    assert "another process is running them" in capsys.readouterr().out
    assert read_record(record_path(out, "busy", "first", 0))["status"] == "finished"
    assert read_record(second) is None and (out / "busy" / "executions.log").read_text().split() == ["1"]
    assert runner.main([str(table_path), "--notebook", str(nb), "--out", str(out), "--no-progress"]) == 0
    assert read_record(second)["status"] == "finished"


def test_report_attributes_each_claim_to_error_types_and_says_how_runs_were_made(tmp_path):
    """Issue 17 item 4: a record's TIDE breakdown (record["errors"]) gives each claim its change per error type."""
    from onestage.analysis.errors import ERROR_TYPES
    from onestage.experiments.aggregate import report
    from onestage.experiments.records import write_json_atomic
    from onestage.experiments.tables import load_table

    table = load_table("fcos_centerness")
    for row, dupe in (("none", 4.0), ("cls", 1.0), ("reg", 1.0), ("computed", 3.0)):
        for seed in range(2):
            errs = {"delta_ap": {t: (dupe + seed if t == "dupe" else 1.0) for t in ERROR_TYPES},
                    "fp_delta_ap": 10.0, "fn_delta_ap": 5.0 + seed, "counts": {}}
            write_json_atomic(tmp_path / f"{row}__seed{seed}.json", {
                "status": "finished", "metrics": {"bbox": {"AP": 30.0 - dupe + seed}}, "errors": {"bbox": errs},
                "iterations": 300, "config": {"preset": "fast", "train_cfg": {"batch_size": 8, "min_size": [256],
                                                                               "test_min_size": 320}}})
    text, _ = report(table, tmp_path)
    assert "Error attribution" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| none vs cls (bbox) | 2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2 + ERROR_TYPES.index("dupe")] == "+3.0 ± 0.0" and cells[2 + ERROR_TYPES.index("cls")] == "+0.0 ± 0.0"
    assert "Runs: 8 finished" in text and "--preset fast --seeds 2 --train-set max_iters=300" in text
