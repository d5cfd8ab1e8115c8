"""Fault injection: SIGKILL at random moments, kills during a checkpoint write, stop signals, a dead DDP rank,
NaN losses, and bad inputs. Every fault ends in a clean resume or one clear error, never lost or damaged runs."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, TINY, launch_cmd, make_jpeg_folder, run_script, script_env, traceback_from_kd
from kd.checkpoint import save_model_file
from kd.models import build_model
from kd.tracking import read_metrics

pytestmark = pytest.mark.slow
# 20 optimizer steps per epoch, ~0.5 s per epoch on 2 cores: long enough to interrupt, short enough to repeat.
SYNTH = ("--dataset", "synthetic", "--arch", "resnet8", "--batch-size", "32", "--workers", "0", "--log-every", "4",
         "--report-to", "none", "--seed", "3")


def start(*args, nproc=1, python=False):
    cmd = [sys.executable, str(REPO / "train_teacher.py")] if python else launch_cmd("train_teacher.py", nproc)
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120, poll=0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the run")


def last_step(out):
    try:
        return read_metrics(out)[-1]["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return -1


def comparable(out):
    return [{k: v for k, v in r.items() if k not in ("time", "train/img_per_s")} for r in read_metrics(out)]


def weights(out):
    return torch.load(out / "model_final.pt", weights_only=True)["state_dict"]


def assert_same_run(out, ref):
    assert comparable(out) == comparable(ref)
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_script("train_teacher.py", *SYNTH, "--epochs", "4", "--output-dir", out)
    return out


def test_sigkill_anywhere_then_resume_is_exact(reference, tmp_path):
    """Killed mid-epoch (twice, at different points) and while writing a checkpoint, then resumed: the same
    final weights and the same metrics.jsonl, each step and epoch once, as the uninterrupted run."""
    out = tmp_path / "run"
    args = (*SYNTH, "--epochs", "4", "--output-dir", out, "--resume")
    ckpt_root = out / "checkpoints"
    # 1. mid-epoch 2
    proc = start(*args, python=True)
    assert wait_for(lambda: last_step(out) >= 28, proc)
    proc.kill(); proc.wait()
    # 2. while the epoch-3 state is being written (its temporary folder exists)
    proc = start(*args, python=True)
    caught = wait_for(lambda: ckpt_root.is_dir() and any(p.name.startswith(".tmp-epoch_0003")
                                                         for p in ckpt_root.iterdir()), proc)
    proc.kill(); proc.wait()
    assert caught, "the run finished before the checkpoint write could be interrupted"
    assert [p.name for p in sorted(ckpt_root.iterdir())] == [".tmp-epoch_0003", "epoch_0001", "epoch_0002"]
    # 3. early in epoch 4 after resuming from the last complete checkpoint (epoch 2; the torn one is ignored)
    proc = start(*args, python=True)
    assert wait_for(lambda: last_step(out) >= 64, proc)
    stdout = proc.stdout.read() if proc.poll() is not None else ""
    proc.kill(); proc.wait()
    stdout += proc.stdout.read()
    assert "ignoring 1 incomplete checkpoint(s) (interrupted while saving): .tmp-epoch_0003" in stdout
    assert "resumed from" in stdout and "epoch_0002" in stdout
    run_script("train_teacher.py", *args)
    assert_same_run(out, reference)
    epochs = [r["epoch"] for r in read_metrics(out) if "val/acc1" in r]
    assert epochs == [1, 2, 3, 4]


def test_stop_signal_saves_mid_epoch_and_resume_is_exact(reference, tmp_path):
    """SIGTERM: the step finishes, the state is saved mid-epoch, exit code 3; resuming skips the batches already
    trained on (same sampler order) and ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    args = (*SYNTH, "--epochs", "4", "--output-dir", out, "--resume")
    proc = start(*args, python=True)
    assert wait_for(lambda: last_step(out) >= 24, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr[-2000:]
    assert "received SIGTERM" in stderr and "stopped by signal at step" in stdout
    (saved,) = [p.name for p in (out / "checkpoints").iterdir() if "_step_" in p.name]
    assert saved.startswith("epoch_0001_step_")
    run_script("train_teacher.py", *args)
    assert_same_run(out, reference)


def test_stop_with_persistent_packed_workers_resumes_exactly(tmp_path):
    """Packed data keeps its DataLoader workers across epochs: a mid-epoch stop and resume still equal the
    uninterrupted run (the workers draw no random numbers; the crops are hashed on the training device)."""
    data = make_jpeg_folder(tmp_path / "jpegs", train_per_class=100, val_per_class=4)
    common = (*TINY, "--data-dir", data, "--data-format", "packed", "--packed-dir", tmp_path / "packs", "--arch",
              "resnet8", "--report-to", "none", "--workers", "2", "--epochs", "3", "--log-every", "4")
    run_script("train_teacher.py", *common, "--output-dir", tmp_path / "ref")
    out = tmp_path / "run"
    proc = start(*common, "--output-dir", out, "--resume", python=True)
    assert wait_for(lambda: last_step(out) >= 48, proc)  # 37 steps per epoch: in epoch 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr[-2000:]
    assert any("_step_" in p.name for p in (out / "checkpoints").iterdir())
    run_script("train_teacher.py", *common, "--output-dir", out, "--resume")
    assert_same_run(out, tmp_path / "ref")


def test_stop_signal_with_two_ddp_ranks(tmp_path):
    """SIGUSR1 (Slurm's warning signal) to both ranks: they agree on one step, save once and exit; resume ends
    with every epoch once."""
    out = tmp_path / "run"
    args = (*SYNTH, "--epochs", "3", "--batch-size", "16", "--output-dir", out, "--resume")
    proc = start(*args, nproc=2)
    assert wait_for(lambda: last_step(out) >= 8, proc, poll=0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train_teacher.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[0].send_signal(signal.SIGUSR1)  # one rank is enough: the others learn it at the next agreement step
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and "_step_" in saved[0]
    run_script("train_teacher.py", *args, nproc=2)
    records = read_metrics(out)
    assert [r["epoch"] for r in records if "val/acc1" in r] == [1, 2, 3]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps))


def test_second_signal_exits_at_once():
    """A repeat within REPEAT_WINDOW is the same stop delivered twice (Slurm does that); a later one kills."""
    code = ("import os, signal, time\nfrom kd.signals import REPEAT_WINDOW, StopRequest\nstop = StopRequest().install()\n"
            "stop.training = True\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\nos.kill(os.getpid(), signal.SIGTERM)\n"
            "print('alive', stop.signum, flush=True)\ntime.sleep(REPEAT_WINDOW + 0.2)\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=script_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGUSR1 and "received SIGUSR1" in proc.stderr
    assert proc.stdout.strip() == f"alive {int(signal.SIGUSR1)}"


def test_dead_rank_ends_the_job(tmp_path):
    out = tmp_path / "run"
    proc = start(*SYNTH, "--epochs", "50", "--batch-size", "16", "--output-dir", out, nproc=2)
    assert wait_for(lambda: last_step(out) >= 4, proc, poll=0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train_teacher.py" in " ".join(p.cmdline())]
    ranks[1].kill()
    started = time.monotonic()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - started < 60
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_nan_loss_stops_naming_the_step(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_teacher.py", *SYNTH, "--epochs", "2", "--lr", "1e30", "--warmup-epochs", "0",
                      "--output-dir", out, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "loss became NaN/inf at step" in errors[0]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob(".tmp-*"))


def test_out_of_memory_is_one_line_and_keeps_the_saved_epoch(tmp_path):
    """A batch that does not fit (CUDA's OutOfMemoryError, raised here by a user model at the 2nd step of epoch 2):
    one line naming what torch tried to allocate and what to do; the first epoch's checkpoint resumes."""
    out = tmp_path / "run"
    flags = ("--dataset", "synthetic", "--arch", "model_factories:out_of_memory_net", "--batch-size", "128",
             "--workers", "0", "--report-to", "none", "--epochs", "2", "--output-dir", out)
    env = script_env(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    proc = run_script("train_teacher.py", *flags, check=False, env=env)
    error = one_error(proc)
    assert error.startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB") and \
        "--batch-size" in error and "more detail" not in proc.stderr, error
    assert (out / "checkpoints").is_dir() and not list(out.glob("checkpoints/.tmp-*"))


# ---------------------------------------------------------------- bad input: one line, exit != 0, nothing damaged
def one_error(proc):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert not traceback_from_kd(proc.stderr) and '.py", line' not in proc.stderr.split("accelerate")[0]
    return errors[0]


def python_run(script, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    model = build_model("resnet8", 3)
    meta = {"arch": "resnet8", "num_classes": 3, "class_names": ["cat", "dog", "fox"], "image_size": 32,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "val_acc1": 0.5}
    save_model_file(out / "model_best.pt", model.state_dict(), meta)
    return out / "model_best.pt"


def _corrupt(kind, path, tmp_path):
    if kind == "missing":
        return tmp_path / "nope.pt"
    bad = tmp_path / "bad.pt"
    if kind == "truncated":
        bad.write_bytes(path.read_bytes()[:5000])
    elif kind == "not a checkpoint":
        bad.write_text("hello")
    elif kind == "a plain state_dict":
        torch.save(build_model("resnet8", 3).state_dict(), bad)
    elif kind == "unknown arch":
        blob = torch.load(path, weights_only=True)
        blob["meta"]["arch"] = "no_such_net"
        torch.save(blob, bad)
    elif kind == "wrong class count":
        save_model_file(bad, build_model("resnet8", 4).state_dict(), {
            **torch.load(path, weights_only=True)["meta"], "num_classes": 4, "class_names": list("abcd")})
    return bad


@pytest.mark.parametrize("kind,message", [
    ("missing", "does not exist"),
    ("truncated", "truncated or not a kd model file"),
    ("not a checkpoint", "truncated or not a kd model file"),
    ("a plain state_dict", "is not a kd model file"),
    ("unknown arch", "no_such_net"),
    ("wrong class count", "has 4 classes, the dataset 3"),
])
def test_bad_teacher_checkpoint(teacher_file, jpeg_folder, tmp_path, kind, message):
    path = _corrupt(kind, teacher_file, tmp_path)
    before = path.read_bytes() if path.exists() else None
    proc = python_run("distill.py", *TINY, "--data-dir", jpeg_folder, "--teacher-checkpoint", path,
                      "--output-dir", tmp_path / "o", "--report-to", "none")
    assert message in one_error(proc)
    assert proc.returncode == 2
    assert (path.read_bytes() if path.exists() else None) == before


@pytest.mark.parametrize("flags,message", [
    (("--image-size", "4"), "--image-size must be >= 16"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--output-dir", "/proc/kd-run"), "is not writable"),
    (("--batch-size", "64"), "fewer than one global batch"),
])
def test_bad_flags(jpeg_folder, tmp_path, flags, message):
    args = (*TINY, "--data-dir", jpeg_folder, "--arch", "resnet8", "--output-dir", tmp_path / "o", "--report-to",
            "none")
    assert message in one_error(python_run("train_teacher.py", *args, *flags))


def test_corrupt_image_named_or_skipped(jpeg_folder, tmp_path):
    from conftest import make_jpeg_folder
    data = make_jpeg_folder(tmp_path / "data", 8, 4)
    bad = data / "train" / "dog" / "dog_003.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    common = ("--dataset", "imagefolder", "--data-dir", data, "--arch", "resnet8", "--image-size", "32",
              "--batch-size", "8", "--epochs", "1", "--report-to", "none")
    error = one_error(python_run("train_teacher.py", *common, "--workers", "1", "--output-dir", tmp_path / "a"))
    assert "cannot decode image" in error and "dog_003.jpg" in error and "--skip-corrupt" in error
    proc = python_run("train_teacher.py", *common, "--workers", "0", "--skip-corrupt", "--output-dir", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: skipping unreadable image") == 1 and "dog_003.jpg" in proc.stderr


def test_wandb_not_logged_in_runs_offline(tmp_path):
    env = script_env(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"))
    env.pop("WANDB_MODE")
    proc = python_run("train_teacher.py", *SYNTH[:-4], "--epochs", "1", "--output-dir", tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: W&B: not logged in") == 1
    assert list((tmp_path / "o" / "wandb").glob("offline-run-*"))


def test_wandb_unreachable_falls_back_offline(tmp_path):
    env = script_env(HOME=str(tmp_path), WANDB_API_KEY="a" * 40, WANDB_BASE_URL="http://127.0.0.1:9",
                     WANDB_INIT_TIMEOUT="5")
    env.pop("WANDB_MODE")
    proc = python_run("train_teacher.py", *SYNTH[:-4], "--epochs", "1", "--output-dir", tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: W&B could not start online") == 1
    (run,) = (tmp_path / "o" / "wandb").glob("offline-run-*")
    assert len([r for r in read_metrics(tmp_path / "o") if "val/acc1" in r]) == 1


def test_disk_full_while_checkpointing_is_one_line_and_resume_is_exact(reference, tmp_path):
    """A disk that fills up during the epoch-2 checkpoint: one line naming the mount, the partial checkpoint
    removed, epoch 1's intact; --resume on the still-full disk: one line; once space is freed the resumed run ends
    where the uninterrupted one does."""
    disk = tmp_path / "disk"
    disk.mkdir()
    # 1.4 MB: room for the run's files and one checkpoint of this resnet8 (0.7 MB), not for a second one
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "run"
        args = (*SYNTH, "--epochs", "4", "--output-dir", out, "--resume")
        error = one_error(python_run("train_teacher.py", *args))
        assert error.startswith(f"error: no space left on {disk} writing {out / 'checkpoints' / '.tmp-epoch_0002'}")
        assert "the last complete checkpoint is epoch_0001" in error
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]
        filler = disk / "filler"
        with open(filler, "wb") as f:  # whatever is left, taken by something else
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert "no space left on" in one_error(python_run("train_teacher.py", *args))
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        proc = python_run("train_teacher.py", *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert_same_run(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_ctrl_c_saves_and_exits_3(tmp_path):
    """Ctrl-C (SIGINT to the terminal's whole process group: the run and its DataLoader workers) stops like
    SIGTERM: the state saved mid-epoch, exit code 3, no KeyboardInterrupt traceback."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_teacher.py"), *SYNTH, "--workers", "1", "--epochs", "4",
                             "--output-dir", str(out)], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(lambda: last_step(out) >= 8, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]
    assert "received SIGINT: saving state at the next log step" in stderr and "stopped by signal at step" in stdout
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr
    assert any("_step_" in p.name for p in (out / "checkpoints").iterdir())


def test_sigterm_to_a_single_process_launcher_reaches_the_run(tmp_path):
    """`accelerate launch` with one process forwards no signal and dies on SIGTERM: the training process learns
    it (PR_SET_PDEATHSIG), saves mid-epoch and exits instead of training on as an orphan."""
    out = tmp_path / "run"
    launcher = start(*SYNTH, "--epochs", "4", "--output-dir", out)
    assert wait_for(lambda: last_step(out) >= 8, launcher)
    (child,) = [p for p in psutil.Process(launcher.pid).children() if "train_teacher.py" in " ".join(p.cmdline())]
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=120)  # returns once the child has closed the shared pipes too
    child.wait(timeout=30)
    assert "received SIGTERM" in stderr and "stopped by signal at step" in stdout, stderr[-3000:]
    assert any("_step_" in p.name for p in (out / "checkpoints").iterdir())
    assert not (out / ".kd.lock").exists()


def test_two_rank_stop_with_wandb_exits_3_on_every_rank(tmp_path):
    """W&B on (offline): closing it must not destroy the process group before the ranks' last barrier (which
    made rank 0 exit 1): every rank exits 3, the code of a saved stop."""
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd("train_teacher.py", 2) + [str(a) for a in (
        *SYNTH[:-2], "--report-to", "wandb", "--epochs", "3", "--batch-size", "16", "--output-dir", out)],
        cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: last_step(out) >= 8, proc, poll=0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "train_teacher.py" in " ".join(p.cmdline())]
    ranks[1].send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert "stopped by signal at step" in stdout, stderr[-3000:]
    assert "process group has not been initialized" not in stderr
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)
    assert len(codes) >= 2 and set(codes) == {"3"}, stderr[-3000:]  # torchrun lists the root cause twice
    assert list((out / "wandb").glob("offline-run-*"))
