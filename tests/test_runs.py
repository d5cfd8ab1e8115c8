"""kd.runs: the one naming rule and the grid expansion, and how kd.report groups runs by it."""
import pytest

from kd import report, runs
from test_report import fake_run


def test_names():
    assert runs.run_name("teacher", {}) == "teacher"
    assert runs.run_name("student", {}, seed=0) == "student-s0"
    assert runs.run_name("distill", {"alpha": 0.1, "temperature": 4.0}, seed=2) == "distill-a0.1-T4-s2"
    assert runs.run_name("distill", {"method": "dkd", "alpha": 0.1, "temperature": 4, "train_fraction": 0.05,
                                     "lr": 1e-05}, seed=1) == "distill-dkd-a0.1-T4-f0.05-lr1e-05-s1"
    assert runs.label({"method": "dkd", "alpha": 0.1, "temperature": 4.0, "train_fraction": 0.05}) == \
        "dkd α=0.1 T=4 labels=0.05"
    # a switch by its short name: on, or off with no-
    assert runs.run_name("distill", {"method": "kd", "alpha": 0.1, "temperature": 7, "logit_standardize": True},
                         seed=0) == "distill-kd-a0.1-T7-ls-s0"
    assert runs.run_name("distill", {"logit_standardize": False, "compile": True}) == "distill-no-ls-compile"
    assert runs.label({"method": "kd", "logit_standardize": True}) == "kd LS"
    assert runs.label({"logit_standardize": False}) == "no LS"


def test_student_points_split_the_grid():
    grid = {"train_fraction": [0.1, 1.0], "method": ["kd", "dkd"], "alpha": [0.1]}
    baselines, distilled = runs.student_points(grid, {"alpha": 0.1, "temperature": 7.0})
    assert baselines == [{"train_fraction": 0.1}, {"train_fraction": 1.0}]
    assert [list(p.items()) for p in distilled[:2]] == [
        [("method", "kd"), ("alpha", 0.1), ("temperature", 7.0), ("train_fraction", 0.1)],
        [("method", "dkd"), ("temperature", 7.0), ("train_fraction", 0.1)]]  # DKD has no alpha
    assert len(distilled) == 4
    assert runs.student_points({}, {"alpha": 0.3, "temperature": 2.0}) == ([{}], [{"alpha": 0.3, "temperature": 2.0}])
    # each method names the axes it uses; an unset --temperature is the method's paper value
    _, points = runs.student_points({"method": ["kd", "dkd", "dist", "fitnet"]}, {"alpha": 0.1, "temperature": None})
    assert [runs.run_name("distill", p, 0) for p in points] == [
        "distill-kd-a0.1-T7-s0", "distill-dkd-T4-s0", "distill-dist-T1-s0", "distill-fitnet-s0"]


def test_union_points_keeps_each_point_once():
    grids = [{"method": ["kd", "dkd"]}, {"method": ["kd"], "logit_standardize": [True]}, {"method": ["dkd"]}]
    baselines, distilled = runs.union_points(grids, {"alpha": 0.1, "temperature": None})
    assert baselines == [{}]
    assert [runs.run_name("distill", p) for p in distilled] == ["distill-kd-a0.1-T7", "distill-dkd-T4",
                                                                "distill-kd-a0.1-T2-ls"]
    assert runs.union_points([], {"alpha": 0.3, "temperature": 2.0}) == ([{}], [{"alpha": 0.3, "temperature": 2.0}])
    # an unset --temperature with logit standardization is the method's standardized one (kd: 2)
    _, (point,) = runs.union_points([{"method": ["kd"], "logit_standardize": [True]}], {"alpha": 0.1,
                                                                                        "temperature": None})
    assert runs.run_name("distill", point) == "distill-kd-a0.1-T2-ls"


def test_report_without_agreement_warns_nothing(tmp_path):
    import warnings
    root = tmp_path / "runs"
    fake_run(root, "teacher", "teacher", 0, [0.9])
    fake_run(root, "student-s0", "student", 0, [0.3])
    fake_run(root, "distill-a0.1-T4-s0", "distill", 0, [0.5], 0.1, 4.0)  # no agreement figures
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = report.summarize(report.load_local_runs(root))
        (row,) = summary["rows"]
        assert row["agreement_final"]["mean"] is None and row["agreement_final"]["n"] == 0
        assert report.takeaway_table(summary).splitlines()[2].endswith("| +20.00 | - |")
    assert report.welch_test([], [0.5])["diff"] is None


def test_report_compares_each_fraction_with_its_own_baseline(tmp_path):
    root = tmp_path / "fractions"
    fake_run(root, "teacher", "teacher", 0, [0.9])
    for fraction, base, gain in ((0.1, 0.40, 0.10), (1.0, 0.80, 0.01)):
        for seed in (0, 1):
            fake_run(root, runs.run_name("student", {"train_fraction": fraction}, seed), "student", seed,
                     [base + 0.01 * seed], config={"train_fraction": fraction})
            fake_run(root, runs.run_name("distill", {"alpha": 0.1, "temperature": 4, "train_fraction": fraction},
                                         seed), "distill", seed, [base + gain + 0.01 * seed], 0.1, 4.0,
                     config={"train_fraction": fraction})
    summary = report.summarize(report.load_local_runs(root))
    assert "train_fraction" in summary["axes"]
    rows = {r["setting"]["train_fraction"]: r for r in summary["rows"]}
    assert rows[0.1]["delta_final"]["diff"] == pytest.approx(0.10)
    assert rows[1.0]["delta_final"]["diff"] == pytest.approx(0.01)
    assert rows[0.1]["baseline_runs"] == ["student-f0.1-s0", "student-f0.1-s1"]
    table = report.takeaway_table(summary)
    assert "| labels | α | T |" in table and "| 0.1 | 0.1 | 4 |" in table
    assert "α=0.1 T=4 labels=0.1" in report.verdict(summary)[0]
    # the whole report, as kd.experiment runs it: fractions.png (final top-1 against the fraction of labels)
    report.main([str(root), "--no-publish"])
    assert (root / "report" / "fractions.png").stat().st_size > 1000


def test_teacher_from_elsewhere_is_named_by_its_config(tmp_path):
    """An experiment's teacher.checkpoint lives outside the report's folder: the table names its arch from the
    config.json of the output dir the distilled runs were given."""
    import json
    teacher = tmp_path / "elsewhere" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "config.json").write_text('{"arch": "resnet20", "job_type": "teacher"}')
    root = tmp_path / "runs"
    fake_run(root, "student-s0", "student", 0, [0.3])
    fake_run(root, "distill-a0.1-T4-s0", "distill", 0, [0.5], 0.1, 4.0, teacher_acc=0.57,
             config={"teacher_checkpoint": str(teacher)})
    summary = report.summarize(report.load_local_runs(root))
    assert summary["teacher"]["arch"] == "resnet20"
    assert report.takeaway_table(summary).splitlines()[2].startswith("| resnet20 (57.00) |")
    # a model file in that dir names it too
    config_file = root / "distill-a0.1-T4-s0" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "teacher_checkpoint": str(teacher / "model_best.pt")}))
    assert report.summarize(report.load_local_runs(root))["teacher"]["arch"] == "resnet20"


def test_unfinished_runs_are_left_out_and_named(tmp_path, capsys):
    """A run stopped (or still training) at an early epoch would enter the table with that epoch's accuracy."""
    import json
    root = tmp_path / "runs"
    fake_run(root, "student-s0", "student", 0, [0.3, 0.4])
    fake_run(root, "distill-a0.1-T4-s0", "distill", 0, [0.5, 0.6], 0.1, 4.0)
    fake_run(root, "distill-a0.1-T4-s1", "distill", 1, [0.2], 0.1, 4.0)
    config_file = root / "distill-a0.1-T4-s1" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "epochs": 2}))  # 1 of 2 epochs
    names = [r["name"] for r in report.load_local_runs(root)]
    assert names == ["distill-a0.1-T4-s0", "student-s0"]
    assert "left out 1 unfinished run(s) (distill-a0.1-T4-s1)" in capsys.readouterr().err


def test_verdict_never_prints_p_0():
    row = {"label": "α=0.1 T=7", "delta_final": {"diff": 0.06, "p": 2e-5, "se": 0.004},
           "distilled_final": {"mean": 0.44}, "student_final": {"mean": 0.38}}
    assert report.verdict({"rows": [row]})[0].endswith("beyond the noise between seeds (p<0.001)")
