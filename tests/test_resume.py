"""Resume semantics: exact mid-epoch on image folders, continued under another number of processes or batch size
(the remaining samples of the epoch once each, the schedule in epochs), changed recipes refused by name, --epochs
extended with a stated schedule segment, every resume recorded."""
import json
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from conftest import REPO, TINY, launch_cmd, make_jpeg_folder, run_script, script_env
from kd.data import EpochSampler
from kd.tracking import read_metrics
from test_reliability import assert_same_run, last_step, wait_for

pytestmark = pytest.mark.slow
SYNTH = ("--dataset", "synthetic", "--arch", "resnet8", "--workers", "0", "--log-every", "4", "--report-to", "none",
         "--seed", "5")


def start(*args, nproc=1):
    cmd = launch_cmd("train_teacher.py", nproc) if nproc > 1 else [sys.executable, str(REPO / "train_teacher.py")]
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def python_run(*args):
    return subprocess.run([sys.executable, str(REPO / "train_teacher.py"), *map(str, args)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=600)


def stop_after(proc, out, step, nproc=1):
    assert wait_for(lambda: last_step(out) >= step, proc, timeout=300, poll=0.01)
    if nproc == 1:
        proc.send_signal(signal.SIGTERM)
    else:  # Slurm's warning signal to one rank: the others learn it at the next agreement step
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "train_teacher.py" in " ".join(p.cmdline())]
        ranks[0].send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert "stopped by signal at step" in stdout, stderr[-3000:]
    return stdout


def trained_indices(size, seed, epoch, geometry_runs):
    """The sample indices each (processes, batch size, batches per process) run trains of one epoch, the way
    Accelerate shards the EpochSampler's order; each run continues where the previous one stopped."""
    sampler, seen, offset = EpochSampler(range(size), seed), [], 0
    for processes, batch_size, batches in geometry_runs:
        sampler.set_epoch(epoch)
        sampler.resume_at(epoch, offset)
        shards = [list(BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=True), processes, rank))
                  for rank in range(processes)]
        taken = [shard[:batches] if batches is not None else shard for shard in shards]
        seen += [i for shard in taken for batch in shard for i in batch]
        offset += processes * batch_size * min(len(t) for t in taken)
    return seen


@pytest.mark.parametrize("runs", [
    [(1, 32, 4), (2, 32, None)],  # 1 -> 2 processes
    [(2, 16, 5), (1, 16, None)],  # 2 -> 1
    [(1, 32, 3), (1, 24, 2), (2, 8, None)],  # another batch size, then another geometry again
])
def test_epoch_sampler_continues_the_epoch_in_any_geometry(runs):
    """The mechanism, on the sharding Accelerate applies: after a stop the remaining samples of the epoch are
    trained once each, none twice, none lost (beyond the last incomplete global batch, as every epoch)."""
    size, seed, epoch = 240, 7, 3
    seen = trained_indices(size, seed, epoch, runs)
    assert len(seen) == len(set(seen))
    last_global = runs[-1][0] * runs[-1][1]
    assert size - last_global < len(seen) <= size
    whole = trained_indices(size, seed, epoch, [(1, 1, None)])
    assert set(seen) == set(whole[:len(seen)])  # a prefix of the one permutation, whatever the geometry


def test_mid_epoch_resume_on_image_folders_is_exact(tmp_path):
    """SIGTERM mid-epoch with folder data decoded and augmented in 2 workers, then --resume: the same metrics and
    final weights as the uninterrupted run (per-sample augmentation seeds; loaders with their own generator)."""
    data = make_jpeg_folder(tmp_path / "jpegs", train_per_class=40, val_per_class=4)
    common = (*TINY, "--data-dir", data, "--arch", "resnet8", "--report-to", "none", "--workers", "2", "--epochs",
              "2", "--log-every", "3", "--head", "mlp-student")  # the MLP head has dropout: the RNG matters too
    run_script("train_teacher.py", *common, "--output-dir", tmp_path / "ref")
    out = tmp_path / "run"
    stop_after(start(*common, "--output-dir", out, "--resume"), out, 6)  # 15 steps per epoch: mid-epoch 1
    assert any("_step_" in p.name for p in (out / "checkpoints").iterdir())
    proc = python_run(*common, "--output-dir", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, tmp_path / "ref")


def test_resume_under_other_processes_and_batch_size(tmp_path):
    """1 process stopped mid-epoch -> 2 processes (stopped mid-epoch again) -> 1 process at another batch size:
    every epoch once, each resumed epoch trains exactly its remaining samples, the LR continues the curve."""
    out = tmp_path / "run"
    args = (*SYNTH, "--epochs", "3", "--warmup-epochs", "0.5", "--output-dir", out, "--resume")
    stop_after(start(*args, "--batch-size", "32"), out, 8)  # 20 steps of 32 per epoch
    stopped = json.loads((out / "config.json").read_text())
    (ckpt,) = [p for p in (out / "checkpoints").iterdir() if "_step_" in p.name]
    done_1 = int(ckpt.name.split("_step_")[1]) * 32
    stdout = stop_after(start(*args, "--batch-size", "16", nproc=2), out, 16, nproc=2)
    assert "resuming with another geometry (1 processes x --batch-size 32" in stdout
    assert f"the remaining samples of epoch 1 ({done_1} of 640 done) are trained once" in stdout
    proc = python_run(*args, "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes x --batch-size 16 x --grad-accum-steps 1 -> 1 processes x --batch-size 8" in proc.stdout
    records = read_metrics(out)
    assert [r["epoch"] for r in records if "val/acc1" in r] == [1, 2, 3]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps))
    history = json.loads((out / "config.json").read_text())["resume_history"]
    assert [h["changes"]["num_processes"] for h in history] == [[1, 2], [2, 1]]
    assert [h["changes"]["batch_size"] for h in history] == [[32, 16], [16, 8]]
    assert stopped["resume_history"] == []
    # sample accounting: run 1 at 32 per step, run 2 at 2 x 16, run 3 at 8; each resume continued where the
    # previous run stopped, so the step counts add up to exactly 3 epochs of 640 samples
    first, second = (h["epoch"] * 640 + h["samples_in_epoch"] for h in history)
    assert first == done_1 and history[0]["global_step"] == first // 32
    assert history[1]["global_step"] == first // 32 + (second - first) // 32
    assert steps[-1] <= history[1]["global_step"] + (3 * 640 - second) // 8 == records[-1]["step"]
    assert all(0 <= r["train/lr"] <= 0.1 for r in records if "train/lr" in r)  # 0 after the last step


def test_changed_recipe_is_refused_and_epochs_extend_with_a_stated_segment(tmp_path):
    out = tmp_path / "run"
    common = (*SYNTH, "--batch-size", "32", "--output-dir", out)
    assert python_run(*common, "--epochs", "2", "--lr", "0.05").returncode == 0
    before = (out / "metrics.jsonl").read_text()
    proc = python_run(*common, "--epochs", "3", "--lr", "0.01", "--seed", "6", "--resume")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "--lr 0.01 (saved: 0.05), --seed 6 (saved: 5)" in errors[0]
    assert (out / "metrics.jsonl").read_text() == before
    proc = python_run(*common, "--epochs", "4", "--lr", "0.05", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("--epochs 2 -> 4: the LR schedule restarts at the peak at 0.05 from epoch 2 and decays along a new "
            "cosine segment to 0 at epoch 4") in proc.stdout
    config = json.loads((out / "config.json").read_text())
    (entry,) = config["resume_history"]
    assert entry["changes"] == {"epochs": [2, 4]} and entry["epoch"] == 2 and entry["from"].endswith("epoch_0002")
    records = read_metrics(out)
    assert [r["epoch"] for r in records if "val/acc1" in r] == [1, 2, 3, 4]
    lrs = [(r["step"], r["train/lr"]) for r in records if "train/lr" in r]
    # epoch 3 starts at the peak (the first logged LR there is just below it) and epoch 4 ends near 0
    third = [lr for step, lr in lrs if 40 < step <= 60]
    assert 0.045 < third[0] <= 0.05 and third == sorted(third, reverse=True) and lrs[-1][1] < 0.002
    assert torch.load(out / "model_final.pt", weights_only=True)["meta"]["epoch"] == 4
