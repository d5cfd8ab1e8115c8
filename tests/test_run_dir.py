"""One run per output dir (an exclusive lock, a stale one taken over), nothing written by a start that fails, and
bad inputs that each end in one line: faults injected into real runs, bad files and flags checked in-process."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, make_jpeg_folder, script_env, traceback_from_kd
from kd.checkpoint import load_model_file, save_model_file
from kd.compute import resolve_precision
from kd.errors import UserError
from kd.models import build_model
from kd.outdir import OutputDirLock
from kd.teacher_cache import TeacherCache
from kd.tracking import read_metrics

pytestmark = pytest.mark.slow
SYNTH = ("--dataset", "synthetic", "--arch", "resnet8", "--batch-size", "32", "--workers", "0", "--log-every", "4",
         "--report-to", "none")
META = {"arch": "resnet8", "num_classes": 3, "class_names": ["cat", "dog", "fox"], "image_size": 32,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "val_acc1": 0.5}


def python_run(script, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_error(proc):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert not traceback_from_kd(proc.stderr), proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "model_best.pt"
    save_model_file(path, build_model("resnet8", 3).state_dict(), META)
    return path


# ---------------------------------------------------------------- the lock
def test_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """In-process halves of the lock: a second holder is refused with the first one's pid; a lock file left by a
    process that died (the kernel dropped its flock) is taken over with a line naming it."""
    code = ("import sys, time\nfrom kd.outdir import OutputDirLock\nOutputDirLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".kd.lock")], cwd=REPO,
                              env=script_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} on "):
        OutputDirLock(tmp_path / ".kd.lock").acquire()
    holder.kill()
    holder.wait()
    lock = OutputDirLock(tmp_path / ".kd.lock")
    line = lock.acquire()
    assert f"pid {holder.pid}" in line and "no longer running" in line
    assert json.loads((tmp_path / ".kd.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".kd.lock").exists()


def test_second_run_on_a_running_dir_is_refused_and_overwrite_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "train_teacher.py"), *SYNTH, "--epochs", "30",
                              "--output-dir", str(out)], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = 180
        while not (out / "metrics.jsonl").exists() and deadline > 0 and first.poll() is None:
            deadline -= 0.2
            subprocess.run(["sleep", "0.2"])
        assert (out / "run.json").is_file()
        for flags in (("--resume",), ("--overwrite",), ()):
            error = one_error(python_run("train_teacher.py", *SYNTH, "--epochs", "30", "--output-dir", out, *flags))
            assert "is in use by another run" in error or "already holds a teacher run" in error
            if flags:
                assert f"pid {first.pid}" in error
        assert (out / "run.json").is_file() and (out / "metrics.jsonl").is_file()
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    proc = python_run("train_teacher.py", *SYNTH, "--epochs", "1", "--output-dir", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "taking over the lock of a run that ended without releasing it" in proc.stdout
    assert f"pid {first.pid}" in proc.stdout and not (out / ".kd.lock").exists()


# ---------------------------------------------------------------- a failed start writes nothing
def test_failed_starts_leave_nothing_and_the_corrected_command_runs(teacher_file, tmp_path):
    data = make_jpeg_folder(tmp_path / "data", 8, 4)
    out = tmp_path / "runs" / "distill"
    common = (*TINY, "--student-arch", "resnet8", "--epochs", "1", "--report-to", "none", "--output-dir", out)
    good = ("--data-dir", data, "--teacher-checkpoint", teacher_file)
    bad_cache = tmp_path / "cache.pt"
    bad_cache.write_bytes(os.urandom(4000))
    failures = {
        "bad teacher path": (("--data-dir", data, "--teacher-checkpoint", tmp_path / "nope"), "does not exist"),
        "data error": (("--data-dir", tmp_path / "nodata", "--teacher-checkpoint", teacher_file), "does not exist"),
        "batch too large": ((*good, "--batch-size", "64"), "fewer than one global batch"),
        "missing --resume path": ((*good, "--resume", tmp_path / "ckpt"), "is not a complete checkpoint"),
        "corrupt cache": ((*good, "--data-format", "packed", "--packed-dir", tmp_path / "packs", "--teacher-cache",
                           bad_cache), "cannot read teacher cache"),
    }
    for name, (flags, message) in failures.items():
        error = one_error(python_run("distill.py", *common, *flags))
        assert message in error, (name, error)
        assert not (tmp_path / "runs").exists(), f"{name} left {list((tmp_path / 'runs').rglob('*'))}"
    proc = python_run("distill.py", *common, *good)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"checkpoints", "config.json", "metrics.jsonl", "model_best.pt", "model_final.pt", "run.json"} <= {
        p.name for p in out.iterdir()} and not (out / ".kd.lock").exists()


# ---------------------------------------------------------------- bad files and flags: one line each
@pytest.mark.parametrize("kind", ["truncated", "random bytes", "text file", "a model file"])
def test_bad_teacher_cache_is_one_line(teacher_file, tmp_path, kind):
    path = tmp_path / "cache.pt"
    torch.save({"format": "kd-teacher-cache/1", "meta": {}, "tensors": {"views": torch.zeros(8, 2, 5)}}, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(2048))
    elif kind == "text file":
        path.write_text("views,logits\n1,2\n")
    else:
        path.write_bytes(teacher_file.read_bytes())
    with pytest.raises(UserError, match="cannot read teacher cache|is not a kd teacher cache|is incomplete"):
        TeacherCache.load(path)


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("class_names"), "class_names (missing)"),
    (lambda m: m.update(val_acc1="0.9"), "val_acc1 (str, not a number)"),
    (lambda m: m.update(num_classes="3"), "num_classes (str, not int)"),
])
def test_damaged_model_metadata_is_one_line(tmp_path, change, message):
    meta = dict(META)
    change(meta)
    save_model_file(tmp_path / "m.pt", build_model("resnet8", 3).state_dict(), meta)
    with pytest.raises(UserError, match="damaged metadata") as info:
        load_model_file(tmp_path / "m.pt")
    assert message in str(info.value)


@pytest.mark.parametrize("flags,message", [
    (("--momentum", "-1"), "--momentum must be >= 0"),
    (("--temperature", "inf"), "--temperature must be a finite number"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--warmup-epochs", "50", "--epochs", "1"), "--warmup-epochs 50 is longer than the run"),
])
def test_bad_numbers_are_refused_by_name(flags, message):
    import distill
    from kd.config import validate
    with pytest.raises(UserError) as info:
        validate(distill.parse_args(["--dataset", "synthetic", *flags]))
    assert message in str(info.value)


def test_fp16_on_cpu_is_one_line_for_both_scripts(teacher_file, tmp_path):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    data = make_jpeg_folder(tmp_path / "data", 4, 2)
    for script, extra in (("distill.py", ("--teacher-checkpoint", teacher_file, "--student-arch", "resnet8")),
                          ("train_teacher.py", ("--arch", "resnet8"))):
        error = one_error(python_run(script, *TINY, *extra, "--data-dir", data, "--mixed-precision", "fp16",
                                     "--output-dir", tmp_path / script, "--report-to", "none"))
        assert "fp16 (--mixed-precision fp16) needs a CUDA GPU" in error
        assert not (tmp_path / script).exists()


def test_dataset_is_inferred_from_the_folder(tmp_path):
    from kd.fastai_data import infer_dataset
    (tmp_path / "imagewoof2-160" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "train").mkdir(parents=True)
    assert infer_dataset(str(tmp_path / "imagewoof2-160")) == "imagewoof"
    assert infer_dataset(str(tmp_path)) == "imagewoof"  # holds a fast.ai copy
    assert infer_dataset(str(tmp_path / "mine")) == "imagefolder"
    assert infer_dataset(None) == "imagewoof"


def test_packed_dirs_of_same_named_folders_differ(tmp_path):
    from kd.packed import default_packed_dir
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data").mkdir(parents=True)
    a, b = default_packed_dir(tmp_path / "a" / "data"), default_packed_dir(tmp_path / "b" / "data")
    assert a != b and a.name.startswith("data-") and b.name.startswith("data-")


def test_compare_and_report_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "kd.compare", str(tmp_path / "empty")], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert "no config.json" in one_error(proc)
    code = "import sys; sys.modules['matplotlib'] = None; from kd.report import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "empty"), "--no-publish"], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=120)
    assert "pip install 'kd[report]'" in one_error(proc)
    assert not (tmp_path / "empty" / "report").exists()
