"""Slurm: the real launch/ scripts submitted to a throw-away local cluster (tests/slurm/local_cluster.sh: nodes n1,
n2 on this host, 4 CPUs each, no accounting, so job states come from `scontrol show job`), in CPU mode. Every
job is watched by polling squeue every 0.5 s; assertions read the files the jobs write, not only exit codes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO, TINY, script_env
from kd.checkpoint import checkpoint_dirs
from wandb_reader import offline_runs, read_run

CLUSTER = REPO / "tests" / "slurm" / "local_cluster.sh"
LAUNCH = REPO / "launch"
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1")  # CPU mode: no GPUs, one CPU per training process
SMALL = (*TINY, "--epochs", "2")


def _run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def slurm_nodes() -> list[str]:
    """A local Slurm cluster: started (2 nodes) when running as root, else one that is already up. Left running:
    CI stops it with `bash tests/slurm/local_cluster.sh down`."""
    if shutil.which("bash") is None:
        pytest.skip("Slurm tests need bash")
    if os.geteuid() == 0:
        up = _run(["bash", CLUSTER, "up", "--nodes", "2"], timeout=600)
        if up.returncode != 0:
            pytest.skip(f"could not start the local Slurm cluster: {(up.stderr or up.stdout).strip()[-800:]}")
    elif shutil.which("sinfo") is None or _run(["bash", CLUSTER, "status"]).returncode != 0:
        pytest.skip("Slurm tests need root to start a local cluster (tests/slurm/local_cluster.sh up), or one "
                    "already up")
    return _run(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split()


@pytest.fixture
def two_nodes(slurm_nodes):
    if len(slurm_nodes) < 2:
        pytest.skip(f"the running Slurm cluster has {len(slurm_nodes)} node(s), this test needs 2")


def job_env(**extra) -> dict:
    """What the jobs inherit (sbatch exports the submitter's environment): CPU mode, offline W&B, this Python."""
    env = {k: v for k, v in script_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "KD_"))}
    env.update({"KD_CPU": "1", "KD_PYTHON": sys.executable, "KD_DATA_CACHE": script_env()["KD_DATA_CACHE"], **extra})
    return env


def sbatch(script: str, *flags, opts=(), log_dir: Path, env: dict | None = None, cwd: Path = REPO) -> str:
    """`sbatch OPTS launch/<script> FLAGS` in cwd (by default the repository root, the scripts' default KD_HOME);
    returns the job id."""
    proc = _run(["sbatch", "--parsable", "-o", f"{log_dir}/%x-%j.out", *opts, LAUNCH / script, *flags], cwd=cwd,
                env=env or job_env())
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-5000:]}" for p in sorted(log_dir.glob("*.out")))


def wait_gone(job_ids, log_dir: Path, timeout: float) -> None:
    """Polls squeue every 0.5 s until no job (or array task) of job_ids is pending, running or completing."""
    ids = ",".join(job_ids)
    deadline = time.monotonic() + timeout
    while _run(["squeue", "-h", "-j", ids, "-o", "%i"]).stdout.strip():
        if time.monotonic() > deadline:
            _run(["scancel", *job_ids])
            pytest.fail(f"jobs {ids} still queued after {timeout} s\n{logs(log_dir)}")
        time.sleep(0.5)


def job_records(job_id: str) -> list[dict]:
    """`scontrol show job -o`: one {key: value} per job, one per task of an array job."""
    out = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]


def assert_completed(job_id: str, log_dir: Path, restarts: int = 0) -> dict:
    (record,) = job_records(job_id)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), \
        f"job {job_id}: {record}\n{logs(log_dir)}"
    return record


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl that a job may be writing (a half-written last line is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def epochs_of(records: list[dict], key: str) -> list[int]:
    return [r["epoch"] for r in records if key in r]


def restart_log(out: Path) -> list[str]:
    return (out / "slurm_restarts.log").read_text().splitlines()


def assert_finished_run(out: Path, epochs: int, job_id: str, restarts: int = 0) -> dict:
    """Checkpoints, model files, each epoch once in metrics.jsonl, and the Slurm job recorded in config.json."""
    assert [p.name for p in checkpoint_dirs(out)][-1] == f"epoch_{epochs:04d}"
    assert (out / "model_best.pt").is_file() and (out / "model_final.pt").is_file()
    records = read_jsonl(out / "metrics.jsonl")
    assert epochs_of(records, "val/acc1") == list(range(1, epochs + 1))
    assert epochs_of(records, "train/epoch_loss") == list(range(1, epochs + 1))
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert len(train_steps) == len(set(train_steps)), "a training step was logged twice"
    config = json.loads((out / "config.json").read_text())
    assert config["slurm"]["job_id"] == job_id and config["slurm"]["restart_count"] == restarts
    assert config["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    starts = [line for line in restart_log(out) if " start " in line]
    assert [re.search(r"restart=(\d+)", s).group(1) for s in starts] == [str(i) for i in range(restarts + 1)]
    assert restart_log(out)[-1].split()[1] == "end" and restart_log(out)[-1].endswith("rc=0 finished")
    return config


# ---------------------------------------------------------------------------------------------- experiment chain
@pytest.mark.slurm
def test_experiment_teacher_array_report(slurm_nodes, jpeg_folder, tmp_path):
    """python -m kd.experiment run FILE --slurm: the teacher; one array over 2 student-only + 2 distilled runs
    (afterok); the report (afterany on the array). Runs named by kd.runs, one W&B group, kd.report's output; a
    second submit skips every finished run."""
    log_dir, root = tmp_path / "logs", tmp_path / "exp-t"
    log_dir.mkdir()
    flags = dict(zip(TINY[::2], TINY[1::2]))
    doc = {"name": "exp-t", "output_dir": str(root),
           "defaults": {**{k[2:]: v for k, v in flags.items()}, "epochs": 1, "data_dir": str(jpeg_folder)},
           "teacher": {"arch": "resnet8"},
           "students": {"student_arch": "resnet8", "grid": {"alpha": [0.3], "temperature": [4]}, "seeds": [0, 1]}}
    (tmp_path / "exp.yaml").write_text(json.dumps(doc))  # JSON is YAML

    def submit() -> list[str | None]:
        proc = _run([sys.executable, "-m", "kd.experiment", "run", tmp_path / "exp.yaml", "--slurm", *CPU_JOB,
                     "--ntasks=1", "-o", f"{log_dir}/%x-%j.out"], cwd=tmp_path, env=job_env(), timeout=120)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        found = re.search(r"teacher (\S+), then (\d+) student runs as array (\S+) \(afterok\), then the report "
                          r"(\d+)", proc.stdout)
        assert found, proc.stdout
        return [None if v == "-" else v for v in found.group(1, 3, 4)], int(found.group(2)), proc.stdout

    (teacher, array, report), n, _ = submit()
    assert n == 4
    waiting = {job: job_records(job)[0] for job in (array, report)}  # while the teacher runs (it takes > 5 s)
    wait_gone([teacher, array, report], log_dir, timeout=420)

    assert waiting[array]["Dependency"].startswith(f"afterok:{teacher}")
    assert re.match(rf"afterok:{teacher}\S*,afterany:{array}", waiting[report]["Dependency"]), waiting[report]
    assert {r["JobState"] for r in waiting.values()} == {"PENDING"}
    tasks = sorted(job_records(array), key=lambda r: int(r["ArrayTaskId"]))
    assert [(r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in tasks] == [
        (str(i), "COMPLETED", "0:0") for i in range(4)], logs(log_dir)
    times = {job: {k: datetime.fromisoformat(r[k]) for k in ("StartTime", "EndTime")} for job, r in (
        (teacher, assert_completed(teacher, log_dir)), (report, assert_completed(report, log_dir)))}
    assert all(datetime.fromisoformat(t["StartTime"]) >= times[teacher]["EndTime"] for t in tasks)
    assert times[report]["StartTime"] >= max(datetime.fromisoformat(t["EndTime"]) for t in tasks)

    expected = {"teacher": ("teacher", None, None, 0), "student-s0": ("student", None, None, 0),
                "distill-a0.3-T4-s0": ("distill", 0.3, 4.0, 0), "student-s1": ("student", None, None, 1),
                "distill-a0.3-T4-s1": ("distill", 0.3, 4.0, 1)}  # array order: the file's run order
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted([*expected, "report"])
    for (name, (job_type, alpha, temperature, seed)), job in zip(expected.items(),
                                                                [teacher] + [t["JobId"] for t in tasks]):
        config = assert_finished_run(root / name, 1, job)  # model_final.pt, epochs, this job in config.json
        assert (config["job_type"], config["seed"], config["wandb_group"]) == (job_type, seed, "exp-t")
        assert config["run_name"] == name
        if job_type == "distill":
            assert (config["alpha"], config["temperature"]) == (alpha, temperature)
            assert config["teacher_checkpoint"] == str(root / "teacher")
        elif job_type == "student":
            assert config["teacher_checkpoint"] == "none"
        (wandb_dir,) = offline_runs(root / name)
        wandb_run = read_run(wandb_dir)
        assert (wandb_run["group"], wandb_run["job_type"], wandb_run["tags"]) == ("exp-t", job_type,
                                                                                   ["exp-t", job_type])

    assert (root / "report" / "report.md").is_file()
    results = json.loads((root / "report" / "results.json").read_text())
    assert sorted(r["name"] for r in results["runs"]) == sorted(expected)
    (row,) = results["summary"]["rows"]
    assert (row["alpha"], row["temperature"], row["seeds"]) == (0.3, 4.0, [0, 1])

    (teacher, array, report), n, out = submit()  # everything finished: only the report is submitted again
    assert (teacher, array, n) == (None, None, 0) and out.count("done already:") == 5
    wait_gone([report], log_dir, timeout=60)
    assert_completed(report, log_dir)


# ---------------------------------------------------------------------------------------------- multi-node
def launcher_lines(log: Path) -> dict[str, list[str]]:
    """{node: launcher argv} from the KD_DRY_RUN=1 lines `kd-launch node=N machine_rank=R: CMD...`."""
    found = {}
    for line in log.read_text().splitlines():
        if m := re.match(r"kd-launch node=(\S+) machine_rank=(\d+): (.*)", line):
            found[m.group(1)] = m.group(3).split()
    return found


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.slurm
def test_multinode_launcher_arguments(two_nodes, tmp_path):
    # GPU mode rendered without GPUs: KD_GPUS_PER_NODE stands in for the node's GPU count.
    gpu = sbatch("teacher.sbatch", "--epochs", "3", "--output-dir", tmp_path / "gpu",
                 opts=("-N", "2", *CPU_JOB, "--job-name=gpu"), log_dir=tmp_path,
                 env=job_env(KD_CPU="0", KD_DRY_RUN="1", KD_GPUS_PER_NODE="4"))
    # CPU mode, submitted from elsewhere (KD_HOME set), default output dir: relative to the submit dir.
    cpu = sbatch("distill.sbatch", "--teacher-checkpoint", "none",
                 opts=("-N", "2", "--ntasks-per-node=2", *CPU_JOB, "--job-name=cpu"), log_dir=tmp_path,
                 env=job_env(KD_DRY_RUN="1", KD_HOME=str(REPO)), cwd=tmp_path)
    wait_gone([gpu, cpu], tmp_path, timeout=60)
    for job, name, per_node in ((gpu, "gpu", 4), (cpu, "cpu", 2)):
        assert_completed(job, tmp_path)
        lines = launcher_lines(tmp_path / f"{name}-{job}.out")
        assert sorted(lines) == ["n1", "n2"], logs(tmp_path)
        ports = set()
        for node, argv in lines.items():
            assert argv[1:3] == ["-m", "accelerate.commands.launch"]
            assert flag(argv, "--num_machines") == "2" and flag(argv, "--num_processes") == str(2 * per_node)
            assert flag(argv, "--machine_rank") == {"n1": "0", "n2": "1"}[node]
            assert flag(argv, "--main_process_ip") == "n1"  # the allocation's first node
            ports.add(flag(argv, "--main_process_port"))
            assert "--resume" in argv
            if name == "gpu":
                assert flag(argv, "--config_file") == str(REPO / "accelerate_config.yaml")
                assert argv[argv.index(str(REPO / "train_teacher.py")) + 1:] == [
                    "--resume", "--epochs", "3", "--output-dir", str(tmp_path / "gpu")]
            else:
                assert "--config_file" not in argv and "--multi_gpu" in argv
                assert flag(argv, "--output-dir") == f"runs/cpu-{job}"  # default: runs/<job name>-<job id>
                assert (tmp_path / f"runs/cpu-{job}/slurm_restarts.log").is_file()
                assert flag(argv, "--teacher-checkpoint") == "none"
        (port,) = ports
        assert 1024 <= int(port) < 65536


@pytest.mark.slurm
def test_multinode_real_job(two_nodes, jpeg_folder, tmp_path):
    out = tmp_path / "teacher"
    job = sbatch("teacher.sbatch", *SMALL, "--arch", "resnet8", "--data-dir", jpeg_folder, "--output-dir", out,
                 opts=("-N", "2", "--ntasks-per-node=1", *CPU_JOB), log_dir=tmp_path)
    wait_gone([job], tmp_path, timeout=120)
    assert_completed(job, tmp_path)
    config = assert_finished_run(out, 2, job)
    assert config["num_processes"] == 2 and config["slurm"]["nodes"] == "n[1-2]"
    assert "nodes=n[1-2] processes=2" in restart_log(out)[0]


# ---------------------------------------------------------------------------------------------- preemption
def wait_for(predicate, what: str, log_dir: Path, job: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            _run(["scancel", job])
            pytest.fail(f"timed out waiting for {what}\n{logs(log_dir)}")
        time.sleep(0.5)


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(slurm_nodes, tmp_path):
    """Run 0 gets Slurm's warning signal (B:USR1, as --signal sends it): the training saves mid-epoch and the
    job requeues itself. Run 1 is requeued from outside (`scontrol requeue`, as preemption does). Run 2
    finishes: every epoch once in metrics.jsonl, one W&B run id, SLURM_RESTART_COUNT recorded."""
    epochs, out, metrics = 8, tmp_path / "teacher", tmp_path / "teacher" / "metrics.jsonl"
    job = sbatch("teacher.sbatch", "--dataset", "synthetic", "--batch-size", "8", "--workers", "0", "--log-every",
                 "5", "--arch", "resnet8", "--epochs", str(epochs), "--output-dir", out,
                 opts=("--ntasks=2", *CPU_JOB), log_dir=tmp_path)

    wait_for(lambda: epochs_of(read_jsonl(metrics), "val/acc1"), "the first epoch", tmp_path, job)
    assert _run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    wait_for(lambda: any("restart=1" in line for line in restart_log(out)), "the requeued run", tmp_path, job)
    stopped_at = max(r["step"] for r in read_jsonl(metrics))
    wait_for(lambda: any(r["step"] > stopped_at and "val/acc1" in r for r in read_jsonl(metrics)),
             "an epoch of the requeued run", tmp_path, job)
    assert _run(["scontrol", "requeue", job]).returncode == 0
    wait_gone([job], tmp_path, timeout=180)

    assert_completed(job, tmp_path, restarts=2)
    config = assert_finished_run(out, epochs, job, restarts=2)
    events = restart_log(out)
    assert any(" signal " in line and "USR1" in line for line in events)
    assert any("stopped on the warning signal: requeueing" in line for line in events)
    assert any("terminated by Slurm" in line for line in events)
    log = (tmp_path / f"kd-teacher-{job}.out").read_text()
    assert "stopped by signal at step" in log
    # W&B is on (offline) in these jobs: its close must not take the process group from the ranks' last barrier;
    # both ranks of the stopped run exit 3, the code of a saved stop (torchrun reports each rank's code)
    assert "process group has not been initialized" not in log
    assert re.findall(r"exitcode\s*:\s*(-?\d+)", log)[:2] == ["3", "3"], log[-4000:]
    resumed = re.findall(r"resumed from \S+/(epoch_\d+\S*):", log)
    assert len(resumed) == 2 and "_step_" in resumed[0], resumed  # run 1 resumed mid-epoch
    runs = offline_runs(out)
    assert len(runs) == 3 and all(r.name.endswith("-" + config["run_id"]) for r in runs)
    # One W&B run id across the restarts. The run killed from outside may leave an empty offline file: Slurm's
    # TERM reaches W&B's service process too, before it flushed.
    ids = [read_run(r).get("run_id") for r in runs]
    assert ids[0] == ids[-1] == config["run_id"] and set(ids) <= {config["run_id"], None}, ids
