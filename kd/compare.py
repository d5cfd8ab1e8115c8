"""Side-by-side summary of finished runs, read from their metrics.jsonl, config.json and compression.json (no W&B
needed), and what distillation gained: the student against its teacher in size, compute, speed and accuracy.

    python -m kd.compare runs/pipeline/teacher runs/pipeline/student runs/pipeline/distill
    python -m kd.compare runs/pipeline/* --json        # one JSON object per run, per line, for scripts

The teacher is a teacher run among the arguments, else the run dir of a distilled run's --teacher-checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kd import footprint
from kd.errors import UserError, user_errors
from kd.methods import method_axes, method_label
from kd.runs import teacher_dir
from kd.tracking import METRICS_FILE, read_metrics


def _footprint_fields(run_dir: Path) -> dict:
    path = run_dir / footprint.FILE
    if not path.is_file():  # a run from before compression figures, or one that has not finished
        return {"params": None, "macs": None, "file_bytes": None, "cpu_b1_ms": None, "cpu_b32_ms": None,
                "cpu_threads": None, "cpu": None, "cuda_b256_ms": None}
    f = json.loads(path.read_text())
    cuda = (f.get("cuda") or {}).get(f"batch{footprint.CUDA_BATCH}") or {}
    return {"params": f["params"], "macs": f["macs"], "file_bytes": f.get("file_bytes"),
            "cpu_b1_ms": f["cpu"]["batch1"]["ms"], "cpu_b32_ms": f["cpu"]["batch32"]["ms"],
            "cpu_threads": f["cpu"]["threads"], "cpu": footprint.summary_values(f)[footprint.CPU],
            "cuda_b256_ms": cuda.get("ms")}


def load_run(run_dir: Path) -> dict:
    """The numbers of one finished run: accuracy (best and final epoch) and its compression figures."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir} is not a run output dir (no config.json and {METRICS_FILE}): pass the "
                        f"--output-dir of a train_teacher.py or distill.py run")
    config = json.loads((run_dir / "config.json").read_text())
    vals = [r for r in read_metrics(run_dir) if "val/acc1" in r]
    if not vals:
        raise UserError(f"{run_dir} has no evaluated epoch yet: wait for its first epoch, or leave it out")
    best = max(vals, key=lambda r: r["val/acc1"])
    distill = config["job_type"] == "distill"
    teacher = teacher_dir(config) if distill else None
    return {
        "run": str(run_dir), "name": run_dir.name, "job_type": config["job_type"],
        "arch": config.get("arch") or config.get("student_arch"), "image_size": config.get("image_size"),
        "method": method_label(config), "alpha": method_axes(config)[0], "temperature": method_axes(config)[1],
        "epochs": vals[-1]["epoch"], "best_acc1": best["val/acc1"], "best_epoch": best["epoch"],
        "final_acc1": vals[-1]["val/acc1"], "final_acc5": vals[-1].get("val/acc5"),
        "agreement": vals[-1].get("val/agreement"), "teacher_dir": str(teacher) if teacher else None, **_footprint_fields(run_dir),
    }


def versus(student: dict, teacher: dict) -> dict:
    """The student against the teacher: footprint.ratios plus the top-1 difference in points, of the shipped
    model_best.pt of each."""
    return {"teacher": teacher["run"], **footprint.ratios(student, teacher),
            "acc1_delta_pt": 100 * (student["best_acc1"] - teacher["best_acc1"])}


def _teacher_for(run: dict, runs: list[dict]) -> dict | None:
    teachers = [r for r in runs if r["job_type"] == "teacher"]
    if teachers:
        return teachers[0]
    candidates = [r["teacher_dir"] for r in runs if r.get("teacher_dir")]
    for path in ([run["teacher_dir"]] if run.get("teacher_dir") else []) + candidates:
        try:
            return load_run(Path(path))
        except UserError:
            continue
    return None


def _count(n) -> str:
    return "-" if n is None else footprint.count_text(n)


def table_row(r: dict) -> dict:
    return {
        "run": r["name"], "job": r["job_type"], "arch": r["arch"],
        "method": r["method"] or "-", "alpha/T": _alpha_t(r),
        "epochs": r["epochs"], "best acc1": f"{r['best_acc1']:.4f} (ep {r['best_epoch']})",
        "final acc1": f"{r['final_acc1']:.4f}",
        "final acc5": "-" if r["final_acc5"] is None else f"{r['final_acc5']:.4f}",
        "agreement": "-" if r["agreement"] is None else f"{r['agreement']:.4f}",
        "params": _count(r["params"]), "MACs": _count(r["macs"]),
        "file": "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 2**20:.1f} MiB",
        "CPU b1": "-" if r["cpu_b1_ms"] is None else f"{r['cpu_b1_ms']:.1f} ms",
        "CPU b32": "-" if r["cpu_b32_ms"] is None else f"{32000 / r['cpu_b32_ms']:.0f} img/s",
    }


def _alpha_t(r: dict) -> str:
    """α and T where the run's method uses them ("-" where not)."""
    alpha, temperature = r["alpha"], r["temperature"]
    if alpha is None and temperature is None:
        return "-"
    return f"{'-' if alpha is None else alpha}/{'-' if temperature is None else f'{temperature:g}'}"


def format_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def compare(run_dirs: list[Path]) -> list[dict]:
    runs = [load_run(d) for d in run_dirs]
    for run in runs:
        teacher = _teacher_for(run, runs) if run["job_type"] != "teacher" else None
        run["vs_teacher"] = versus(run, teacher) if teacher else None
    return runs


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="output dirs of train_teacher.py / distill.py runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run (one per line)")
    args = parser.parse_args(argv)
    with user_errors():
        runs = compare(args.run_dirs)
    if args.json:
        for run in runs:
            print(json.dumps(run))
        return runs
    print(format_table([table_row(r) for r in runs]))
    lines = [f"{r['name']} vs teacher {Path(r['vs_teacher']['teacher']).name}: "
             f"{footprint.tradeoff_line(r['vs_teacher'], r['cpu'], r['vs_teacher']['acc1_delta_pt'])}"
             for r in runs if r["vs_teacher"]]
    if lines:
        print("\nMACs per image (FLOPs / 2, torch.utils.flop_counter); top-1 of each run's model_best.pt\n" +
              "\n".join(lines))
    return runs


if __name__ == "__main__":
    main()
