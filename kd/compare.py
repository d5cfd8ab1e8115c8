"""Side-by-side summary of finished runs, read from their metrics.jsonl and config.json (no W&B needed).

    python -m kd.compare runs/pipeline/teacher runs/pipeline/student runs/pipeline/distill
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kd.tracking import read_metrics


def summarize(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    vals = [r for r in read_metrics(run_dir) if "val/acc1" in r]
    if not vals:
        raise SystemExit(f"error: {run_dir} has no evaluated epoch yet")
    best = max(vals, key=lambda r: r["val/acc1"])
    return {
        "run": run_dir.name, "job": config["job_type"],
        "arch": config.get("arch") or config.get("student_arch"),
        "alpha/T": f"{config['alpha']}/{config['temperature']:g}" if config["job_type"] == "distill" else "-",
        "epochs": vals[-1]["epoch"], "best acc1": f"{best['val/acc1']:.4f} (ep {best['epoch']})",
        "final acc1": f"{vals[-1]['val/acc1']:.4f}", "final acc5": f"{vals[-1]['val/acc5']:.4f}",
        "agreement": f"{vals[-1]['val/agreement']:.4f}" if "val/agreement" in vals[-1] else "-",
    }


def format_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="output dirs of train_teacher.py / distill.py runs")
    args = parser.parse_args(argv)
    print(format_table([summarize(d) for d in args.run_dirs]))


if __name__ == "__main__":
    main()
