"""python -m kd.bench prints one valid JSON line per measurement, on synthetic data and on real JPEGs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, free_port, script_env
from kd.compute import cpu_flags

SMALL = ("--teacher", "resnet8x4", "--student", "resnet8", "--image-size", "32", "--batch-size", "4", "--steps", "2",
         "--warmup", "1", "--views", "2", "--threads", "1")
MODE_FIELDS = {"mode", "img_per_s", "step_ms", "device", "teacher", "student", "image_size", "batch_size",
               "precision", "channels_last", "compile", "data"}


def bench(*args) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "kd.bench", *map(str, args)], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_synthetic_prints_a_line_per_mode_and_a_summary():
    lines = bench("--synthetic", *SMALL)
    modes = [line["mode"] for line in lines]
    assert modes == ["reference", "student", "distill", "cache-build", "distill-cached", "teacher-train", "summary"]
    for line in lines:
        if line["mode"] not in ("summary", "cache-build"):
            assert MODE_FIELDS <= set(line) and line["img_per_s"] > 0 and line["data"] == "synthetic"
    auto = "bf16" if cpu_flags() else "no"  # the default precision follows the CPU's native bf16 support
    assert lines[0]["precision"] == "fp32" and lines[1]["precision"] == auto and lines[1]["channels_last"]
    assert all(line["fused_optimizer"] for line in lines[1:6] if line["mode"] != "cache-build")
    assert set(lines[-1]["speedup_vs_reference"]) == {"reference", "student", "distill", "distill-cached",
                                                      "teacher-train"}


def test_methods_side_by_side_with_kd():
    """--method: each distill mode measures every method; the summary gives each one's step over KD's; a cache
    holds logits only, so distill-cached skips the feature methods."""
    lines = bench("--synthetic", "--mode", "distill", "distill-cached", "--method", "kd", "dkd", "kd+ls", "fitnet",
                  *SMALL)
    measured = [(line["mode"], line["method"]) for line in lines if line["mode"] in ("distill", "distill-cached")]
    assert measured == [("distill", m) for m in ("kd", "dkd", "kd+ls", "fitnet")] + [
        ("distill-cached", m) for m in ("kd", "dkd", "kd+ls")]
    assert set(lines[-1]["step_over_kd"]) == {"distill:dkd", "distill:kd+ls", "distill:fitnet",
                                              "distill-cached:dkd", "distill-cached:kd+ls"}
    assert all(v > 0 for v in lines[-1]["step_over_kd"].values())
    # the same ratios by CPU time (what a shared machine cannot inflate), and each line's CPU time per step
    assert set(lines[-1]["cpu_over_kd"]) == set(lines[-1]["step_over_kd"])
    assert all(v > 0 for v in lines[-1]["cpu_over_kd"].values())
    assert all(line["cpu_ms"] > 0 for line in lines if line["mode"] in ("distill", "distill-cached"))


def test_method_loss_alone_bounds_the_step_over_kd():
    """--mode method-loss: each method's loss alone (forward + backward) on the step's shapes; with distill in the
    same run, the summary bounds each method's step by KD's step plus the difference of the losses."""
    lines = bench("--synthetic", "--mode", "distill", "method-loss", "--method", "kd", "dkd", "dist", "at", "fitnet",
                  *SMALL)
    losses = {line["method"]: line for line in lines if line["mode"] == "method-loss"}
    assert list(losses) == ["kd", "dkd", "dist", "at", "fitnet"] and all(v["loss_ms"] > 0 for v in losses.values())
    assert losses["kd"]["feature_maps"] == [] and losses["at"]["feature_maps"] == [[64, 8, 8], [256, 8, 8]]
    summary = lines[-1]
    assert set(summary["loss_bound_over_kd"]) == {"dkd", "dist", "at", "fitnet"}
    kd_step = summary["step_ms"]["distill"]
    assert summary["loss_bound_over_kd"]["dkd"] == pytest.approx(
        (kd_step + summary["loss_ms"]["dkd"] - summary["loss_ms"]["kd"]) / kd_step, abs=1e-3)


def test_optimizer_implementations_side_by_side():
    lines = bench("--synthetic", "--mode", "optimizer", *SMALL)
    assert [(line["optimizer"], line["implementation"]) for line in lines[:-1]] == [
        (o, i) for i in ("for-loop", "foreach", "fused") for o in ("sgd", "adamw")]
    assert all(line["step_ms"] > 0 for line in lines[:-1]) and lines[-1]["mode"] == "summary"


@pytest.mark.slow
def test_real_jpegs_end_to_end(jpeg_folder, tmp_path):
    lines = bench("--data-dir", jpeg_folder, "--packed-dir", tmp_path, "--workers", "0", "--mode", "reference",
                  "distill-cached", "--profile", tmp_path / "profile", *SMALL)
    assert [line["mode"] for line in lines] == ["reference", "cache-build", "distill-cached", "summary"]
    assert lines[0]["data"].startswith("folder") and lines[2]["data"].startswith("packed")
    assert "Self CPU" in (tmp_path / "profile" / "distill-cached.txt").read_text()


@pytest.mark.slow
def test_ddp_overhead_on_two_processes():
    """Under accelerate launch with 2 CPU processes (gloo): DDP's gradient sync cost and a bare all-reduce."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port",
           str(free_port()), "-m", "kd.bench", "--synthetic", "--mode", "ddp-overhead", "allreduce", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["mode"] for line in lines] == ["ddp-overhead", "allreduce", "summary"]  # printed by rank 0 only
    assert lines[0]["processes"] == 2 and lines[0]["step_ms_synced"] > 0 and lines[0]["step_ms_local"] > 0
    assert lines[1]["allreduce_ms"] > 0 and lines[1]["grad_mbytes"] > 0


@pytest.mark.slow
def test_gpu_bench_script_runs_from_an_export(jpeg_folder, tmp_path):
    """launch/bench_gpu.sh, tried on the CPU with tiny models: import the carried export, every phase but the
    GPU tests, one table."""
    export = [sys.executable, "-m", "kd.packed", "export", "--data-dir", str(jpeg_folder), "--image-size", "32",
              "--pack-size", "40", "--packed-dir", str(tmp_path / "src-packs"), "--out", str(tmp_path / "d.npz")]
    proc = subprocess.run(export, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = script_env(DATA=str(tmp_path / "d.npz"), OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
                     PYTHON=sys.executable, DEVICE="cpu", TEACHER="resnet8x4",
                     STUDENT="resnet8", IMAGE_SIZE="32", PACK_SIZE="40", BATCH="4", STEPS="2", WARMUP="1",
                     VIEWS="2", WORKERS="0", PHASES="data synthetic eager optimizer")
    proc = subprocess.run(["bash", "launch/bench_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out" / "bench.jsonl").read_text().splitlines()]
    modes = [line["mode"] for line in lines]
    assert modes.count("summary") == 4 and modes.count("optimizer") == 6 and "reference" in modes
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| reference | folder |" in table and "| distill-cached | packed |" in table
    assert (tmp_path / "work" / "imported").is_file() and not (tmp_path / "out" / "packs").exists()
    again = subprocess.run(["bash", "launch/bench_gpu.sh"], cwd=REPO, env={**env, "PHASES": "data"},
                           capture_output=True, text=True, timeout=600)  # the import is reused
    assert again.returncode == 0 and "importing" not in again.stderr, again.stderr[-3000:]
