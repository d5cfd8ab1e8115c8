"""kd.report: the takeaway numbers from fabricated runs against values computed here, the statistics against
closed forms, and the files a person reads."""
import json
import math

import numpy as np
import pytest

from kd import report


def fake_run(root, name, job_type, seed, accs, alpha=None, temperature=None, agreement=None, teacher_acc=None,
             config=None):
    extra, run = config, root / name
    run.mkdir(parents=True)
    config = {"job_type": job_type, "seed": seed, "dataset": "imagewoof", "image_size": 32, "epochs": len(accs),
              "arch" if job_type == "teacher" else "student_arch": "resnet20" if job_type == "teacher" else "resnet8"}
    if job_type == "distill":
        config.update(alpha=alpha, temperature=temperature)
    config.update(extra or {})
    (run / "config.json").write_text(json.dumps(config))
    records = [{"step": 0, "time": 100.0, "teacher/val_acc1": teacher_acc}] if teacher_acc else []
    for epoch, acc in enumerate(accs, 1):
        records.append({"step": epoch * 10, "time": 100.0 + 60 * epoch, "train/loss": 1.0 / epoch, "epoch": epoch})
        rec = {"step": epoch * 10, "time": 100.0 + 60 * epoch, "val/acc1": acc, "val/acc5": 0.9, "epoch": epoch}
        if agreement is not None:
            rec["val/agreement"] = agreement
        records.append(rec)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    fake_run(root, "teacher", "teacher", 0, [0.5, 0.6, 0.7])
    student = {0: [0.40, 0.50, 0.55], 1: [0.42, 0.52, 0.54], 2: [0.41, 0.53, 0.56]}
    for seed, accs in student.items():
        fake_run(root, f"student-s{seed}", "student", seed, accs)
    distilled = {0: [0.45, 0.58, 0.60], 1: [0.44, 0.57, 0.61], 2: [0.46, 0.62, 0.59]}
    for alpha, shift in ((0.1, 0.0), (0.05, -0.01)):
        for seed, accs in distilled.items():
            fake_run(root, f"distill-a{alpha}-T7-s{seed}", "distill", seed, [a + shift for a in accs], alpha, 7.0,
                     agreement=0.7, teacher_acc=0.7)
    (root / "teacher.log").write_text("not a run")
    return root


def test_summary_numbers(study):
    summary = report.summarize(report.load_local_runs(study))
    assert summary["teacher"] == {"arch": "resnet20", "final_acc1": 0.7, "best_acc1": 0.7}
    row = next(r for r in summary["rows"] if r["alpha"] == 0.1)
    final, base = [0.60, 0.61, 0.59], [0.55, 0.54, 0.56]
    assert row["distilled_final"]["mean"] == pytest.approx(np.mean(final))
    assert row["distilled_final"]["std"] == pytest.approx(np.std(final, ddof=1))
    assert row["student_final"]["mean"] == pytest.approx(np.mean(base))
    assert row["distilled_best"]["mean"] == pytest.approx(np.mean([0.60, 0.61, 0.62]))  # best != final for seed 2
    assert row["delta_final"]["diff"] == pytest.approx(0.05)
    se = math.sqrt(np.var(final, ddof=1) / 3 + np.var(base, ddof=1) / 3)
    assert row["delta_final"]["se"] == pytest.approx(se) and row["delta_final"]["t"] == pytest.approx(0.05 / se)
    assert row["seeds"] == [0, 1, 2] and row["agreement_final"]["mean"] == pytest.approx(0.7)
    assert summary["wall_hours"] == pytest.approx((4 * 120 + 6 * 180) / 3600)  # first to last record of each run


def test_betainc_and_welch_against_closed_forms():
    assert report._betainc(1, 1, 0.3) == pytest.approx(0.3)
    assert report._betainc(2, 2, 0.5) == pytest.approx(0.5)
    assert report._betainc(2, 1, 0.4) == pytest.approx(0.16)  # I_x(a, 1) = x^a
    # two-sided p of Student's t with 1 dof (Cauchy): 1 - 2 atan(|t|) / pi
    for t in (0.5, 1.0, 3.0):
        assert report._betainc(0.5, 0.5, 1 / (1 + t * t)) == pytest.approx(1 - 2 * math.atan(t) / math.pi)
    # large dof: the normal's 1.96 -> p = 0.05
    assert report._betainc(5e5, 0.5, 1e6 / (1e6 + 1.959964**2)) == pytest.approx(0.05, abs=1e-4)
    result = report.welch_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert result["diff"] == 0 and result["p"] == pytest.approx(1.0)


def test_report_files(study, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    report.main([str(study)])
    out = study / "report"
    for name in ("curves.png", "grid.png", "agreement.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "![curves](curves.png)" in markdown and "| resnet20 (70.00) | resnet8 |" in markdown
    assert "+5.00" in markdown and "selected on the val set" in markdown
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 10 and len(results["summary"]["rows"]) == 2
    printed = capsys.readouterr().out
    assert "W&B offline: skipped the summary run and the W&B Report" in printed


def test_methods_are_an_axis_next_to_alpha_and_temperature(study, capsys):
    """Runs of other methods are grouped by method and the axes that method uses (DKD: T; FitNet: neither; KD+LS
    is kd with logit_standardize), each against the same student-only runs; kd.compare shows the same."""
    from kd import compare
    for seed in range(3):
        fake_run(study, f"dkd-s{seed}", "distill", seed, [0.5, 0.6, 0.62 + seed / 100], 0.1, 4.0,
                 config={"method": "dkd"}, agreement=0.7, teacher_acc=0.7)
        fake_run(study, f"fitnet-s{seed}", "distill", seed, [0.5, 0.5, 0.5], 0.1, None,
                 config={"method": "fitnet"}, agreement=0.6, teacher_acc=0.7)
        fake_run(study, f"kdls-s{seed}", "distill", seed, [0.5, 0.5, 0.58], 0.1, 7.0,
                 config={"method": "kd", "logit_standardize": True}, agreement=0.6, teacher_acc=0.7)
    summary = report.main([str(study), "--no-publish"])
    arms = sorted((r["method"], r["alpha"], r["temperature"], len(r["runs"])) for r in summary["rows"])
    assert arms == [("dkd", None, 4.0, 3), ("fitnet", None, None, 3), ("kd", 0.05, 7.0, 3), ("kd", 0.1, 7.0, 3),
                    ("kd+ls", 0.1, 7.0, 3)]
    dkd = next(r for r in summary["rows"] if r["method"] == "dkd")
    assert dkd["distilled_final"]["mean"] == pytest.approx(0.63) and len(dkd["baseline_runs"]) == 3
    table = report.takeaway_table(summary)
    # logit standardization is part of the method's name (kd+ls), not a column of true/false next to every method
    assert "| dkd | - | 4 |" in table and "| fitnet | - | - |" in table and "| kd+ls | 0.1 | 7 |" in table
    assert "| kd | 0.1 | 7 |" in table and "LS" not in table.splitlines()[0]
    assert any(line.startswith("kd+ls α=0.1 T=7: distilled") for line in report.verdict(summary))
    assert (study / "report" / "grid.png").is_file()
    capsys.readouterr()
    compare.main([str(study / "dkd-s0"), str(study / "fitnet-s0"), str(study / "distill-a0.1-T7-s0"),
                  str(study / "student-s0")])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:5] == ["run", "job", "arch", "method", "alpha/T"]
    assert rows[2].split()[3:5] == ["dkd", "-/4"] and rows[3].split()[3:5] == ["fitnet", "-"]
    assert rows[4].split()[3:5] == ["kd", "0.1/7"] and rows[5].split()[3:5] == ["-", "-"]


def test_no_baseline_is_one_clear_error(tmp_path, capsys):
    fake_run(tmp_path / "s", "distill-a", "distill", 0, [0.5], 0.1, 7.0)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "s"), "--no-publish"])
    assert exit_info.value.code == 2
    assert "0 student-only and 1 distilled" in capsys.readouterr().err


def test_wandb_report_blocks_build_offline(study):
    """The W&B Report is built with wandb-workspaces (optional); its blocks construct without network."""
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    runset = wr.Runset(entity="e", project="kd", filters='Metric("Group") == "study"')
    panel = wr.LinePlot(x="epoch", y=["val/acc1"], groupby_aggfunc="mean", groupby_rangefunc="minmax")
    assert wr.PanelGrid(runsets=[runset], panels=[panel]).runsets[0].filters == 'Metric("Group") == "study"'
