"""python -m kd.experiment: the file's validation (in process), --dry-run's run list, and real runs of the
scripts on JPEGs: a 2-seed experiment, a rerun that trains nothing, an interrupted run resumed by rerunning."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, script_env
from kd.experiment.__main__ import main

TINY_DEFAULTS = {"dataset": "imagefolder", "image_size": 32, "batch_size": 8, "workers": 0, "log_every": 2,
                 "lr": 0.05, "warmup_epochs": 0.5, "epochs": 1}


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def experiment(tmp_path, **changes) -> dict:
    doc = {"name": "t", "output_dir": str(tmp_path / "runs"), "defaults": {"dataset": "synthetic", "epochs": 1},
           "teacher": {"arch": "resnet8"},
           "students": {"student_arch": "resnet8", "grid": {"alpha": [0.1, 0.5]}, "seeds": [0, 1]}}
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            doc[section][sub] = value
        elif value is None:
            doc.pop(section)
        else:
            doc[section] = value
    return doc


def error_of(tmp_path, capsys, doc, *extra) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(write(tmp_path / "e.yaml", doc)), "--dry-run", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("changes, message", [
    ({"epoch": 3}, "unknown key 'epoch'"),
    ({"defaults": {"epoch": 3}}, "'epoch' is not a flag of train_teacher.py: did you mean epochs?"),
    ({"defaults": {"alpha": 0.5}}, "defaults: 'alpha' is not a flag of train_teacher.py"),
    ({"teacher__arch": "resnet88"}, "run teacher (train_teacher.py): unknown architecture 'resnet88'"),
    ({"teacher__student_arch": "resnet8"}, "teacher: 'student_arch' is not a flag of train_teacher.py"),
    ({"students__temprature": 4}, "'temprature' is not a flag of distill.py: did you mean temperature?"),
    ({"students__grid": {"alpah": [0.1]}}, "'alpah' is not a flag of distill.py: did you mean alpha?"),
    ({"students__grid": {}}, "students.grid is empty"),
    ({"students__grid": []}, "students.grid is an empty list"),
    ({"students__grid": [{"alpha": [0.1]}, {"alpha": []}]}, "students.grid[1].alpha: must be a non-empty list"),
    ({"students__grid": [[{"alpha": [0.1]}]]}, "students.grid[0] must be a mapping of keys to value lists"),
    ({"students__grid": "alpha"}, "students.grid must be a mapping of keys to value lists"),
    ({"students__grid": {"alpha": []}}, "students.grid.alpha: must be a non-empty list"),
    ({"students__grid": {"alpha": 0.1}}, "students.grid.alpha: must be a non-empty list"),
    ({"students__grid": {"alpha": [0.1, 2.0]}}, "run distill-a2-T7-s0 (distill.py): --alpha must be in [0, 1]"),
    ({"students__grid": {"alpha": [0.1, 0.10]}}, "the same name (distill-a0.1-T7-s0, distill-a0.1-T7-s1)"),
    ({"defaults": {"epochs": "many"}}, "argument --epochs: invalid int value: 'many'"),
    ({"defaults": {"compile": "sometimes"}}, "defaults: compile must be true or false"),
    ({"students__seeds": []}, "students.seeds: must be a non-empty list of integers"),
    ({"students__seed": 3}, "'seed' is set by kd.experiment: use students.seeds"),
    ({"defaults": {"output_dir": "x"}}, "'output_dir' is set by kd.experiment: set output_dir at the top level"),
    ({"teacher": {"checkpoint": "t", "arch": "resnet8"}}, "teacher: with checkpoint, nothing else is trained"),
    ({"students": None}, "students: say which students to train"),
    ({"name": None}, "name: give the experiment a name"),
])
def test_bad_files_are_one_error_naming_the_key(tmp_path, capsys, changes, message):
    assert message in error_of(tmp_path, capsys, experiment(tmp_path, **changes))
    assert not (tmp_path / "runs").exists()  # nothing written before the file is valid


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path / "e.yaml")])
    assert "is not valid YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path / "missing.yaml")])
    assert "cannot read the experiment file" in capsys.readouterr().err


def dry_run_names(capsys, *argv) -> list[tuple[str, str]]:
    assert main(["run", *map(str, argv), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    return [(line.split()[0], line.split("]  ", 1)[1]) for line in lines]


def test_dry_run_lists_every_run_with_its_command(tmp_path, capsys):
    doc = experiment(tmp_path, students={"student_arch": "resnet8", "temperature": 4, "seeds": [0, 1],
                                         "grid": {"alpha": [0.1, 0.5], "train_fraction": [0.1, 1]}})
    runs = dry_run_names(capsys, write(tmp_path / "e.yaml", doc), "--set", "defaults.epochs=3")
    names = [name for name, _ in runs]
    per_seed = ["student-f0.1-s{}", "student-f1-s{}", "distill-a0.1-T4-f0.1-s{}", "distill-a0.1-T4-f1-s{}",
                "distill-a0.5-T4-f0.1-s{}", "distill-a0.5-T4-f1-s{}"]
    assert names == ["teacher"] + [n.format(s) for s in (0, 1) for n in per_seed]
    commands = dict(runs)
    root = tmp_path / "runs"
    assert commands["teacher"].split("train_teacher.py ", 1)[1].split() == [
        "--dataset", "synthetic", "--epochs", "3", "--arch", "resnet8", "--seed", "0", "--output-dir",
        str(root / "teacher"), "--run-name", "teacher", "--wandb-group", "t", "--wandb-tags", "t", "teacher",
        "--resume"]
    distilled = commands["distill-a0.5-T4-f0.1-s1"].split("distill.py ", 1)[1].split()
    assert distilled == ["--dataset", "synthetic", "--epochs", "3", "--student-arch", "resnet8", "--temperature",
                         "4", "--alpha", "0.5", "--train-fraction", "0.1", "--teacher-checkpoint",
                         str(root / "teacher"), "--seed", "1", "--output-dir", str(root / "distill-a0.5-T4-f0.1-s1"),
                         "--run-name", "distill-a0.5-T4-f0.1-s1", "--wandb-group", "t", "--wandb-tags", "t",
                         "distill", "--resume"]
    baseline = commands["student-f1-s0"].split("distill.py ", 1)[1].split()
    assert "--alpha" not in baseline and baseline[baseline.index("--teacher-checkpoint") + 1] == "none"
    # a teacher from elsewhere: no teacher run; no baseline
    doc = experiment(tmp_path, teacher={"checkpoint": "runs/old/teacher"},
                     students={"student_arch": "resnet8", "baseline": False})
    (only,) = dry_run_names(capsys, write(tmp_path / "e.yaml", doc))
    assert only[0] == "distill-a0.1-T7-s0" and "--teacher-checkpoint runs/old/teacher" in only[1]


def test_a_list_of_grids_is_their_union(tmp_path, capsys):
    """The methods study in one file: KD with and without logit standardization next to DKD and AT."""
    doc = experiment(tmp_path, students={"student_arch": "resnet8", "seeds": [0], "grid": [
        {"method": ["kd", "dkd", "at"]}, {"method": ["kd"], "logit_standardize": [True]}]})
    runs = dict(dry_run_names(capsys, write(tmp_path / "e.yaml", doc)))
    assert list(runs) == ["teacher", "student-s0", "distill-kd-a0.1-T7-s0", "distill-dkd-T4-s0", "distill-at-s0",
                          "distill-kd-a0.1-T2-ls-s0"]
    assert "--logit-standardize" in runs["distill-kd-a0.1-T2-ls-s0"].split()
    assert "--logit-standardize" not in runs["distill-kd-a0.1-T7-s0"].split()
    # a point that trains as one from another grid is that run (logit_standardize false is plain kd)
    doc["students"]["grid"] = [{"method": ["kd"], "logit_standardize": [True, False]}, {"method": ["kd"]}]
    assert [n for n, _ in dry_run_names(capsys, write(tmp_path / "e.yaml", doc))] == [
        "teacher", "student-s0", "distill-kd-a0.1-T2-ls-s0", "distill-kd-a0.1-T7-no-ls-s0"]
    # the students' own method and switch name the run as they train it (DKD: T 4; LS: T 2)
    for flags, name in (({"method": "dkd"}, "distill-T4-s0"), ({"logit_standardize": True}, "distill-a0.1-T2-s0")):
        plain = experiment(tmp_path, students={"student_arch": "resnet8", "seeds": [0], "baseline": False, **flags})
        ((got, command),) = [r for r in dry_run_names(capsys, write(tmp_path / "e.yaml", plain)) if r[0] != "teacher"]
        assert got == name, command
    # the same point from two grids is one run
    doc["students"]["grid"] = [{"method": ["kd", "dkd"]}, {"method": ["dkd", "dist"]}]
    assert [n for n, _ in dry_run_names(capsys, write(tmp_path / "e.yaml", doc))] == [
        "teacher", "student-s0", "distill-kd-a0.1-T7-s0", "distill-dkd-T4-s0", "distill-dist-T1-s0"]


def test_every_preset_is_valid(capsys):
    presets = sorted((REPO / "experiments").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"smoke", "laptop", "reference", "cpu-study", "gpu-study",
                                         "label-fraction-cpu", "methods-cpu"}
    for preset in presets:
        assert main(["run", str(preset), "--dry-run"]) == 0, preset
    assert "labels" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real runs
def run_experiment(file: Path, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kd.experiment", "run", str(file), *args], cwd=REPO,
                          env=env or script_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def finished(jpeg_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    doc = {"name": "jpegs", "output_dir": str(root / "runs"),
           "defaults": {**TINY_DEFAULTS, "data_dir": str(jpeg_folder)},
           "teacher": {"arch": "resnet8", "epochs": 2},
           "students": {"student_arch": "resnet8", "grid": {"alpha": [0.3]}, "temperature": 4, "seeds": [0, 1]}}
    file = write(root / "jpegs.yaml", doc)
    proc = run_experiment(file, "--jobs", "2")
    return {"file": file, "root": root / "runs", "first": proc}


@pytest.mark.slow
def test_two_seeds_teacher_baseline_distilled_then_report(finished):
    root = finished["root"]
    names = ["teacher", "student-s0", "distill-a0.3-T4-s0", "student-s1", "distill-a0.3-T4-s1"]
    for name in names:
        config = json.loads((root / name / "config.json").read_text())
        assert (root / name / "model_final.pt").is_file()
        assert (config["run_name"], config["wandb_group"], config["wandb_tags"][0]) == (name, "jpegs", "jpegs")
    assert json.loads((root / "distill-a0.3-T4-s1" / "config.json").read_text())["teacher_checkpoint"] == \
        str(root / "teacher")
    results = json.loads((root / "report" / "results.json").read_text())
    assert sorted(r["name"] for r in results["runs"]) == sorted(names)
    (row,) = results["summary"]["rows"]
    assert (row["alpha"], row["temperature"], row["seeds"], row["student_seeds"]) == (0.3, 4.0, [0, 1], [0, 1])
    assert "within the noise" in finished["first"].stdout or "beyond the noise" in finished["first"].stdout
    record = yaml.safe_load((root / "experiment.yaml").read_text())
    assert record["git"]["commit"] and len(record["git"]["commit"]) == 40
    assert record["students"]["seeds"] == [0, 1] and [r["name"] for r in record["runs"]] == names


@pytest.mark.slow
def test_rerun_trains_nothing(finished):
    root = finished["root"]
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/model_final.pt")}
    proc = run_experiment(finished["file"], "--jobs", "2")
    assert proc.stdout.count("done already:") == 5 and "running:" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/model_final.pt")} == before


@pytest.mark.slow
def test_interrupted_run_resumes_on_rerun(finished, jpeg_folder, tmp_path):
    """SIGTERM to kd.experiment mid-run: the run saves and stops (exit 3); the rerun resumes it from its
    checkpoint and finishes it, with every epoch once in its metrics."""
    doc = {"name": "stop", "output_dir": str(tmp_path / "runs"),
           "defaults": {**TINY_DEFAULTS, "data_dir": str(jpeg_folder), "epochs": 4, "log_every": 1},
           "teacher": {"checkpoint": str(finished["root"] / "teacher")},
           "students": {"student_arch": "resnet8", "baseline": False}}
    file = write(tmp_path / "stop.yaml", doc)
    out = tmp_path / "runs" / "distill-a0.1-T7-s0"
    proc = subprocess.Popen([sys.executable, "-m", "kd.experiment", "run", str(file)], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints").is_dir() or not any((out / "checkpoints").glob("epoch_*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, output
    assert "stopped, state saved: distill-a0.1-T7-s0" in output and "rerun the same command" in output
    assert not (out / "model_final.pt").exists()

    again = run_experiment(file)
    assert "resuming: distill-a0.1-T7-s0" in again.stdout
    log = (tmp_path / "runs" / "distill-a0.1-T7-s0.log").read_text()
    assert "resumed from" in log and (out / "model_final.pt").is_file()
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "val/acc1" in line]
    assert epochs == list(range(1, 5))
