"""End to end: the real scripts under `accelerate launch`, 2 DDP processes on CPU (gloo), on real JPEGs."""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_script, traceback_from_kd
from kd import footprint
from kd.checkpoint import load_model_file
from kd.tracking import read_metrics
from wandb_reader import offline_runs, read_run

pytestmark = pytest.mark.slow
TRAIN_KEYS = {"train/loss", "train/loss_ce", "train/lr", "train/img_per_s", "epoch"}
VAL_KEYS = {"val/loss", "val/acc1", "val/acc5"}


def val_records(output_dir):
    return [r for r in read_metrics(output_dir) if "val/acc1" in r]


def test_teacher_outputs(teacher_dir):
    assert sorted(p.name for p in (teacher_dir / "checkpoints").iterdir()) == ["epoch_0003", "epoch_0004"]
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and config["global_batch_size"] == 16 and config["job_type"] == "teacher"
    records = read_metrics(teacher_dir)
    assert [r["epoch"] for r in val_records(teacher_dir)] == [1, 2, 3, 4]
    train = [r for r in records if "train/loss" in r]
    assert TRAIN_KEYS <= set(train[0]) and "train/loss_kd" not in train[0]
    epoch_losses = [r["train/epoch_loss"] for r in records if "train/epoch_loss" in r]
    assert len(epoch_losses) == 4 and epoch_losses[-1] < epoch_losses[0]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)


def test_teacher_model_file_has_metadata(teacher_dir):
    model, meta = load_model_file(teacher_dir)  # the dir resolves to model_best.pt; no accelerate involved
    best = max(r["val/acc1"] for r in val_records(teacher_dir))
    assert meta["arch"] == "resnet8" and meta["num_classes"] == 3 and meta["class_names"] == ["cat", "dog", "fox"]
    assert meta["image_size"] == 32 and len(meta["mean"]) == 3 and meta["val_acc1"] == pytest.approx(best)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in model.state_dict())


def test_teacher_wandb_offline_run(teacher_dir):
    (run_dir,) = offline_runs(teacher_dir)
    run = read_run(run_dir)
    run_id = json.loads((teacher_dir / "run.json").read_text())["run_id"]
    assert run["run_id"] == run_id and run["job_type"] == "teacher" and run["project"] == "kd"
    assert run["group"] == "g1" and run["config"]["arch"] == "resnet8" and run["config"]["num_processes"] == 2
    keys = set().union(*run["history"])
    assert TRAIN_KEYS | VAL_KEYS | {"train/epoch_loss"} <= keys
    assert run["summary"]["best/val_acc1"] == pytest.approx(max(r["val/acc1"] for r in val_records(teacher_dir)))
    figures = json.loads((teacher_dir / "compression.json").read_text())
    assert run["summary"]["compression/params"] == figures["params"] and run["summary"]["compression/macs"] > 0
    assert run["summary"]["compression/cpu_b1_ms"] == pytest.approx(figures["cpu"]["batch1"]["ms"])


def test_distill_ddp(teacher_dir, jpeg_folder, tmp_path):
    out = tmp_path / "distill"
    proc = run_script("distill.py", *TINY, "--data-dir", jpeg_folder, "--student-arch", "resnet8", "--epochs", "2",
                      "--teacher-checkpoint", teacher_dir, "--alpha", "0.1", "--temperature", "4",
                      "--output-dir", out, nproc=2)
    assert "teacher val top-1" in proc.stdout and "best model:" in proc.stdout
    records = read_metrics(out)
    teacher_acc = load_model_file(teacher_dir)[1]["val_acc1"]
    assert records[0] == {**records[0], "step": 0, "teacher/val_acc1": pytest.approx(teacher_acc)}
    assert {"train/loss_kd", "train/loss_ce"} <= set(records[1])
    vals = val_records(out)
    assert [r["epoch"] for r in vals] == [1, 2] and all(0 <= r["val/agreement"] <= 1 for r in vals)
    run = read_run(offline_runs(out)[0])
    assert run["job_type"] == "distill" and run["config"]["alpha"] == 0.1 and run["config"]["temperature"] == 4
    assert run["config"]["method"] == "kd" and run["config"]["method_settings"]["alpha"] == 0.1
    assert TRAIN_KEYS | VAL_KEYS | {"train/loss_kd", "val/agreement"} <= set().union(*run["history"])
    assert (out / "model_best.pt").is_file() and (out / "checkpoints" / "epoch_0002").is_dir()
    # the student file holds the student only, never the teacher's weights
    assert load_model_file(out)[1]["job_type"] == "distill"
    # kd.compare --json on the two real runs: the figures measured at the end of each, the student against its teacher
    proc = subprocess.run([sys.executable, "-m", "kd.compare", str(teacher_dir), str(out), "--json"],
                          capture_output=True, text=True, check=True, timeout=300)
    teacher, student = map(json.loads, proc.stdout.splitlines())
    model = load_model_file(out)[0]
    assert student["params"] == sum(p.numel() for p in model.parameters()) == teacher["params"]  # both resnet8
    assert student["macs"] == footprint.count_macs(model, 32) and student["file_bytes"] == (out / "model_best.pt").stat().st_size
    assert student["cpu_b1_ms"] > 0 and teacher["vs_teacher"] is None
    assert student["vs_teacher"]["teacher"] == str(teacher_dir) and student["vs_teacher"]["params_ratio"] == 1.0


def test_resume_continues_from_saved_epoch(jpeg_folder, tmp_path):
    out = tmp_path / "teacher"
    common = (*TINY, "--data-dir", jpeg_folder, "--arch", "resnet8", "--output-dir", out)
    run_script("train_teacher.py", *common, "--epochs", "2", nproc=2)
    first_steps = [r["step"] for r in read_metrics(out)]
    proc = run_script("train_teacher.py", *common, "--epochs", "3", "--resume", nproc=2)
    assert "resumed from" in proc.stdout and "epoch 2, step 6" in proc.stdout
    records = read_metrics(out)
    assert [r["epoch"] for r in val_records(out)] == [1, 2, 3]
    assert [r["step"] for r in records][:len(first_steps)] == first_steps
    runs = [read_run(d) for d in offline_runs(out)]
    assert len(runs) == 2 and runs[0]["run_id"] == runs[1]["run_id"]  # the same W&B run continued


def test_student_only_baseline_and_bf16_distill(teacher_dir, jpeg_folder, tmp_path):
    common = (*TINY, "--data-dir", jpeg_folder, "--student-arch", "resnet8", "--epochs", "1")
    run_script("distill.py", *common, "--teacher-checkpoint", "none", "--output-dir", tmp_path / "student")
    run = read_run(offline_runs(tmp_path / "student")[0])
    assert run["job_type"] == "student" and "train/loss_kd" not in set().union(*run["history"])
    assert run["config"]["method"] is None and "method_settings" not in run["config"]
    run_script("distill.py", *common, "--teacher-checkpoint", teacher_dir, "--output-dir", tmp_path / "bf16",
               mixed_precision="bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["mixed_precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in read_metrics(tmp_path / "bf16") if "train/loss" in r)


def test_same_seed_same_metrics(tmp_path):
    def run(name):
        out = tmp_path / name
        run_script("train_teacher.py", "--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2",
                   "--batch-size", "32", "--workers", "1", "--log-every", "5", "--report-to", "none",
                   "--seed", "7", "--output-dir", out)
        return [{k: v for k, v in r.items() if k not in ("time", "train/img_per_s")} for r in read_metrics(out)]
    assert run("a") == run("b")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags,message", [
    (("--alpha", "1.5"), "--alpha must be in [0, 1]"),
    (("--temperature", "0"), "--temperature must be > 0"),
    (("--batch-size", "0"), "--batch-size must be >= 1"),
    (("--data-dir", "/nonexistent/data"), "does not exist"),
])
def test_bad_input_is_one_line(teacher_dir, jpeg_folder, tmp_path, flags, message):
    before = _digest(teacher_dir)
    args = [*TINY, "--data-dir", jpeg_folder, "--teacher-checkpoint", teacher_dir, "--output-dir", tmp_path / "o",
            *flags]
    proc = run_script("distill.py", *args, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    # no traceback from our code (the launcher may add its own report that a child failed)
    assert not traceback_from_kd(proc.stderr)
    assert _digest(teacher_dir) == before


def test_teacher_with_other_classes_is_refused(teacher_dir, tmp_path):
    from conftest import make_jpeg_folder
    other = make_jpeg_folder(tmp_path / "other", 4, 2, classes=("ant", "bee", "cow"))
    proc = run_script("distill.py", *TINY, "--data-dir", other, "--teacher-checkpoint", teacher_dir,
                      "--output-dir", tmp_path / "o", check=False)
    assert proc.returncode != 0 and "error: teacher" in proc.stderr and "'cat'" in proc.stderr


def test_output_dir_holding_a_run_is_not_overwritten(teacher_dir, jpeg_folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(teacher_dir, out)
    before = _digest(out)
    proc = run_script("train_teacher.py", *TINY, "--data-dir", jpeg_folder, "--arch", "resnet8", "--epochs", "1",
                      "--output-dir", out, check=False)
    assert proc.returncode != 0 and "already holds a teacher run" in proc.stderr
    assert _digest(out) == before


def test_real_imagewoof_slice(imagewoof_slice, tmp_path):
    run_script("train_teacher.py", "--dataset", "imagefolder", "--data-dir", imagewoof_slice, "--arch", "resnet8",
               "--image-size", "64", "--epochs", "1", "--batch-size", "16", "--workers", "1",
               "--output-dir", tmp_path / "t", "--report-to", "none")
    meta = load_model_file(tmp_path / "t")[1]
    assert meta["class_names"] == ["n02086240", "n02087394", "n02088364"] and meta["image_size"] == 64


def test_repository_accelerate_config_runs_two_processes_bf16(tmp_path):
    """accelerate_config.yaml (multi-GPU, bf16) is a valid config: on a CPU it runs 2 gloo ranks with bf16."""
    import subprocess
    import sys

    from conftest import REPO, free_port, script_env
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), str(REPO / "train_teacher.py"),
           "--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1", "--batch-size", "32", "--workers", "0",
           "--report-to", "none", "--output-dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["num_processes"] == 2 and config["mixed_precision"] == "bf16"
