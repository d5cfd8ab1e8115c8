"""Did distillation help? The study's takeaway table, plots and a markdown report, from a folder of runs
(metrics.jsonl: always works offline) or from a W&B group (online).

    python -m kd.report runs/study-cpu                       # writes runs/study-cpu/report/
    python -m kd.report study-gpu --wandb-project kd --wandb-entity me   # a W&B group, read through the API

Writes report.md (the table, the plots, how to read them), results.json, curves.png, grid.png, agreement.png.
Online, it also logs the table and plots to a `report` run in the group and builds a W&B Report from the group
(needs the optional `wandb-workspaces` package: pip install -e '.[report]'); offline it says what it skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from kd import runs as naming
from kd import footprint
from kd.errors import UserError, user_errors, warn
from kd.methods import method_label
from kd.tracking import read_metrics, wandb_logged_in


# ---------------------------------------------------------------- reading runs
def _run_record(name: str, config: dict, records: list[dict], figures: dict | None = None) -> dict | None:
    """`figures`: the run's compression figures as W&B summary values (footprint.summary_values), if measured."""
    vals = [r for r in records if "val/acc1" in r]
    if not vals:
        return None
    times = [r["time"] for r in records if "time" in r]
    return {
        "name": name, "job_type": config["job_type"], "seed": config.get("seed"),
        "arch": config.get("arch") or config.get("student_arch"), "alpha": config.get("alpha"),
        "temperature": config.get("temperature"), "dataset": config.get("dataset"),
        "image_size": config.get("image_size"), "epochs_planned": config.get("epochs"),
        "epochs": [r["epoch"] for r in vals], "acc1": [r["val/acc1"] for r in vals],
        "agreement": [r.get("val/agreement") for r in vals],
        "teacher_acc1": next((r["teacher/val_acc1"] for r in records if "teacher/val_acc1" in r), None),
        "wall_seconds": (max(times) - min(times)) if times else None,
        "config": {k: v for k, v in config.items() if k in naming._flag_names()},  # what kd.runs groups by
        "params": (figures or {}).get(footprint.PARAMS), "macs": (figures or {}).get(footprint.MACS),
        "cpu_b1_ms": (figures or {}).get(footprint.CPU_B1_MS), "cpu": (figures or {}).get(footprint.CPU),
    }


def _unfinished(run: dict, run_dir: Path) -> bool:
    """Neither a final model file nor its planned epochs: stopped, failed or still training."""
    planned = run["epochs_planned"]
    return not (run_dir / "model_final.pt").is_file() and bool(planned) and max(run["epochs"]) < planned


def load_local_runs(root: Path) -> list[dict]:
    runs, unfinished = [], []
    for config_file in sorted(Path(root).glob("**/config.json")):
        run_dir = config_file.parent
        if not (run_dir / "metrics.jsonl").exists():
            continue
        figures_file = run_dir / footprint.FILE
        figures = footprint.summary_values(json.loads(figures_file.read_text())) if figures_file.is_file() else None
        run = _run_record(run_dir.name, json.loads(config_file.read_text()), read_metrics(run_dir), figures)
        if run and _unfinished(run, run_dir):
            unfinished.append(run["name"])
        elif run:
            runs.append(run)
    if unfinished:  # a run stopped or still training would enter the table with an early epoch's accuracy
        warn(f"left out {len(unfinished)} unfinished run(s) ({', '.join(unfinished)}): finish them (rerun the "
             f"experiment) and report again")
    if not runs:
        raise UserError(f"no finished epoch in any run under {root}: pass a folder holding run output dirs "
                        f"(each with config.json and metrics.jsonl)")
    return runs


def load_wandb_runs(group: str, project: str, entity: str | None) -> list[dict]:
    import wandb

    try:
        api = wandb.Api(timeout=30)
        path = f"{entity or api.default_entity}/{project}"
        found = list(api.runs(path, filters={"group": group}))
    except Exception as exc:  # noqa: BLE001 - offline, not logged in, unknown project
        raise UserError(f"cannot read W&B group {group!r} of {project} ({exc.__class__.__name__}: {exc}); "
                        f"pass a local runs folder instead") from None
    keys = ["epoch", "val/acc1", "val/agreement", "teacher/val_acc1", "_timestamp"]
    runs = []
    for r in found:
        records = [{k: v for k, v in row.items() if v is not None} for row in r.scan_history(keys=None)]
        records = [{**row, "time": row.get("_timestamp")} for row in records if set(row) & set(keys)]
        figures = {k: v for k, v in r.summary_metrics.items() if k.startswith("compression/")}
        run = _run_record(r.name, {**r.config, "job_type": r.config.get("job_type", r.job_type)}, records,
                          figures or None)
        if run:
            runs.append(run)
    if not runs:
        raise UserError(f"W&B group {group!r} in {project} has no run with a finished epoch")
    return runs


# ---------------------------------------------------------------- statistics
def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * f / a


def welch_test(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(a) - mean(b): the difference, its standard error, t, dof and two-sided p."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if not len(a) or not len(b):
        return {"diff": None, "se": None, "t": None, "dof": None, "p": None}
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "se": None, "t": None, "dof": None, "p": None}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "se": 0.0, "t": math.inf if diff else 0.0, "dof": None, "p": 0.0 if diff else 1.0}
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    return {"diff": diff, "se": se, "t": t, "dof": dof, "p": _betainc(dof / 2, 0.5, dof / (dof + t * t))}


def _stats(values: list[float]) -> dict:
    """mean, std (over seeds), n and the values; mean and std None for no value (e.g. no agreement recorded)."""
    v = np.asarray(values, float)
    if not len(v):
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "values": [float(x) for x in v]}


def _teacher_arch(groups) -> str | None:
    """The architecture of a teacher trained outside these runs (an experiment's teacher.checkpoint): from the
    config.json of the output dir the distilled runs name (paths as they were given, from where kd.report runs)."""
    for group in groups:
        for r in group:
            folder = naming.teacher_dir(r["config"])
            try:
                return json.loads((folder / "config.json").read_text()).get("arch") if folder else None
            except (OSError, ValueError):
                continue
    return None


def summarize(runs: list[dict]) -> dict:
    """One row per distilled setting (kd.runs: method, alpha, temperature and any other gridded key, over its
    seeds), against the student-only runs that share its non-distillation settings (e.g. the label fraction)."""
    teachers = [r for r in runs if r["job_type"] == "teacher"]
    students = [r for r in runs if r["job_type"] == "student"]
    varying = naming.varying_keys(r["config"] for r in runs if r["job_type"] in ("student", "distill"))
    # a distillation setting is an axis only where it differs between distilled runs (students have no method)
    among_distilled = naming.varying_keys(r["config"] for r in runs if r["job_type"] == "distill")
    varying = [k for k in varying if k not in naming.distill_keys() or k in among_distilled]
    baselines, distilled = defaultdict(list), defaultdict(list)
    for r in runs:
        shared, distill = naming.settings({**r["config"], "job_type": r["job_type"]}, varying)
        key = tuple(shared.items())
        if r["job_type"] == "student":
            baselines[key].append(r)
        elif r["job_type"] == "distill":
            distilled[key, tuple(distill.items())].append(r)
    if not students or not distilled:
        raise UserError("the report compares distilled students with student-only runs: the runs hold "
                        f"{len(students)} student-only and {sum(map(len, distilled.values()))} distilled runs")
    rows = []
    for (shared, distill), group in sorted(distilled.items(), key=lambda item: repr(item[0])):
        base = baselines.get(shared)
        if not base:
            continue  # no student-only run with these settings (e.g. its label fraction): nothing to compare
        final, best = [r["acc1"][-1] for r in group], [max(r["acc1"]) for r in group]
        base_final, base_best = [r["acc1"][-1] for r in base], [max(r["acc1"]) for r in base]
        rows.append({
            "method": method_label(group[0]["config"]) or "kd",
            "alpha": dict(distill).get("alpha"), "temperature": dict(distill).get("temperature"),
            "setting": {**dict(distill), **dict(shared)}, "shared": dict(shared),
            "label": naming.label({**dict(distill), **dict(shared)}), "student_arch": group[0]["arch"],
            "distilled_final": _stats(final), "student_final": _stats(base_final),
            "distilled_best": _stats(best), "student_best": _stats(base_best),
            "delta_final": welch_test(final, base_final), "delta_best": welch_test(best, base_best),
            "agreement_final": _stats([r["agreement"][-1] for r in group if r["agreement"][-1] is not None]),
            "seeds": sorted(r["seed"] for r in group), "student_seeds": sorted(r["seed"] for r in base),
            "runs": [r["name"] for r in group], "baseline_runs": [r["name"] for r in base],
        })
    if not rows:
        raise UserError(f"no distilled setting has student-only runs with the same {', '.join(varying)}: add the "
                        f"baseline runs (baseline: true in the experiment file)")
    teacher = teachers[0] if teachers else None
    teacher_acc = teacher["acc1"][-1] if teacher else next((r["teacher_acc1"] for g in distilled.values()
                                                            for r in g if r["teacher_acc1"] is not None), None)
    return {
        "dataset": runs[0]["dataset"], "image_size": runs[0]["image_size"],
        "teacher": {"arch": teacher["arch"] if teacher else _teacher_arch(distilled.values()), "final_acc1": teacher_acc,
                    "best_acc1": max(teacher["acc1"]) if teacher else None},
        "student_arch": students[0]["arch"], "student_seeds": sorted({r["seed"] for r in students}),
        # logit standardization shows in the method (kd+ls), as kd.runs groups it
        "axes": list(dict.fromkeys("method" if k == "logit_standardize" else k for k in varying if k != "seed")),
        "epochs": max(r["epochs"][-1] for r in runs), "rows": rows,
        "wall_hours": sum(r["wall_seconds"] or 0 for r in runs) / 3600,
        "tradeoff": trade_off({"teacher": teachers[:1], **run_groups(runs, rows)}),
    }


def run_groups(runs: list[dict], rows: list[dict]) -> dict[str, list[dict]]:
    """Label -> runs of the summary's rows: each student-only baseline and each distilled setting (seeds
    together), in the rows' order."""
    by_name = {r["name"]: r for r in runs}
    groups = {}
    for row in rows:
        shared = naming.label(row["shared"])
        groups.setdefault(f"student-only {shared}".strip(), [by_name[n] for n in row["baseline_runs"]])
        groups[f"distilled {row['label']}"] = [by_name[n] for n in row["runs"]]
    return groups


def trade_off(groups: dict[str, list[dict]]) -> list[dict]:
    """Per group with compression figures: size, compute, median CPU latency over its seeds, final top-1, and the
    ratios against the teacher (when the teacher was measured)."""
    entries = []
    for label, members in groups.items():
        measured = [r for r in members if r["params"] is not None]
        if not measured:
            continue
        entries.append({"label": label, "arch": measured[0]["arch"], "params": measured[0]["params"],
                        "macs": measured[0]["macs"], "cpu": measured[0]["cpu"],
                        "cpu_b1_ms": float(np.median([r["cpu_b1_ms"] for r in measured])),
                        "acc1_final": _stats([r["acc1"][-1] for r in members])})
    teacher = next((e for e in entries if e["label"] == "teacher"), None)
    for entry in entries:
        entry["vs_teacher"] = None if teacher is None or entry is teacher else {
            **footprint.ratios(entry, teacher),
            "acc1_delta_pt": 100 * (entry["acc1_final"]["mean"] - teacher["acc1_final"]["mean"])}
    return entries


# ---------------------------------------------------------------- output
def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def _delta(d: dict) -> str:
    if d["diff"] is None:
        return "-"
    if d["p"] is None:
        return f"{100 * d['diff']:+.2f}"
    sigma = abs(d["diff"]) / d["se"] if d["se"] else (math.inf if d["diff"] else 0.0)
    return f"{100 * d['diff']:+.2f} ({sigma:.1f}σ, {_p(d['p'])})"


def _p(p: float, digits: int = 3) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.{digits}f}"


def _axis(value) -> str:
    """α or T in a table: '-' where the method does not use it (DKD has no α, FitNet neither)."""
    return "-" if value is None else naming.format_value(value)


def _extra_axes(summary: dict) -> list[str]:
    """Gridded keys beyond α and T (method, label fraction, ...): one table column each."""
    return [k for k in summary.get("axes", []) if k not in ("alpha", "temperature")]


def takeaway_table(summary: dict) -> str:
    t = summary["teacher"]
    extra = _extra_axes(summary)
    head = ("| teacher | student | dataset | " + "".join(f"{naming.LABEL.get(k, k)} | " for k in extra) +
            "α | T | distilled, final | student-only, final | Δ final (Welch) "
            "| distilled, best epoch* | student-only, best epoch* | Δ best* | agreement |")
    lines = [head, "|" + "---|" * (12 + len(extra))]
    teacher = f"{t['arch']} ({100 * t['final_acc1']:.2f})" if t["final_acc1"] is not None else str(t["arch"])
    for row in summary["rows"]:
        cells = "".join(f"{_axis(row['setting'].get(k))} | " for k in extra)
        lines.append(
            f"| {teacher} | {row['student_arch']} | {summary['dataset']} {summary['image_size']} px | {cells}"
            f"{_axis(row['alpha'])} | {_axis(row['temperature'])} | {_pm(row['distilled_final'])} (n={row['distilled_final']['n']}) "
            f"| {_pm(row['student_final'])} (n={row['student_final']['n']}) | {_delta(row['delta_final'])} "
            f"| {_pm(row['distilled_best'])} | {_pm(row['student_best'])} | {_delta(row['delta_best'])} "
            f"| {_pm(row['agreement_final'])} |")
    lines.append("")
    lines.append("Top-1 val accuracy in %, mean ± std over seeds. *Best epoch is selected on the val set itself, "
                 "so it is optimistic; the final epoch is the unbiased number. Δ: distilled − student-only, with "
                 "its size in standard errors (σ) and Welch's two-sided p. Agreement: top-1 agreement of the "
                 "distilled student with the teacher at the final epoch.")
    if "train_fraction" in extra:
        lines.append("labels: the fraction of the training labels (images) each student saw (--train-fraction, a "
                     "stratified subset drawn with the run's seed); the teacher saw its own fraction (usually all).")
    return "\n".join(lines)


def verdict(summary: dict) -> list[str]:
    """One sentence per row: did distillation help, beyond the seed-to-seed noise?"""
    lines = []
    for row in summary["rows"]:
        d = row["delta_final"]
        if d["diff"] is None:
            lines.append(f"{row['label']}: no student-only run with the same settings to compare with")
            continue
        what = f"{row['label']}: distilled {100 * row['distilled_final']['mean']:.2f} % vs student-only " \
               f"{100 * row['student_final']['mean']:.2f} % ({100 * d['diff']:+.2f} pts)"
        if d["p"] is None:
            lines.append(f"{what}: one seed per arm, so no noise estimate: run more seeds to tell")
        elif d["p"] < 0.05 and d["diff"] > 0:
            lines.append(f"{what}: distillation helped, beyond the noise between seeds ({_p(d['p'])})")
        elif d["p"] < 0.05:
            lines.append(f"{what}: distillation hurt, beyond the noise between seeds ({_p(d['p'])})")
        else:
            lines.append(f"{what}: within the noise between seeds ({_p(d['p'], 2)}): no difference shown")
    return lines


def tradeoff_table(summary: dict) -> str:
    """What the student costs against its teacher; empty when no run holds compression figures."""
    entries = summary.get("tradeoff") or []
    if not entries:
        return ""
    lines = ["| model | arch | params | MACs/image | CPU batch 1 | final top-1 | vs teacher |", "|" + "---|" * 7]
    for e in entries:
        vs = e["vs_teacher"]
        versus = footprint.tradeoff_line(vs, e["cpu"], vs["acc1_delta_pt"]) if vs else "-"
        lines.append(f"| {e['label']} | {e['arch']} | {footprint.count_text(e['params'])} | {footprint.count_text(e['macs'])} "
                     f"| {e['cpu_b1_ms']:.2f} ms | {_pm(e['acc1_final'])} (n={e['acc1_final']['n']}) | {versus} |")
    lines += ["", f"MACs: multiply-accumulates per image at {summary['image_size']} px (torch.utils.flop_counter "
              f"FLOPs / 2). CPU batch 1: median latency of a float32 forward on {entries[0]['cpu']} (the median over "
              "seeds). Top-1 in %, mean ± std over seeds."]
    return "\n".join(lines)


def _mean_band(runs: list[dict], key: str):
    length = min(len(r[key]) for r in runs)
    values = np.array([[np.nan if v is None else v for v in r[key][:length]] for r in runs], float)
    epochs = runs[0]["epochs"][:length]
    with warnings.catch_warnings():  # an epoch no run recorded (agreement of student-only runs): NaN, not plotted
        warnings.simplefilter("ignore", RuntimeWarning)
        return epochs, np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def require_matplotlib() -> None:
    """Checked before any work: the plots need matplotlib, an optional dependency (the `report` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("kd.report draws its plots with matplotlib, which is not installed: pip install "
                        "'kd[report]' (or pip install matplotlib)") from None


def make_plots(runs: list[dict], summary: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = run_groups(runs, summary["rows"])

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        return name

    def band_plot(key: str, members_by_label: dict, title: str, ylabel: str, teacher_line: bool):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in members_by_label.items():
            epochs, mean, lo, hi = _mean_band(members, key)
            ax.plot(epochs, 100 * mean, label=f"{label} (n={len(members)})")
            ax.fill_between(epochs, 100 * lo, 100 * hi, alpha=0.2)
        if teacher_line and summary["teacher"]["final_acc1"] is not None:
            ax.axhline(100 * summary["teacher"]["final_acc1"], color="k", ls="--", lw=1,
                       label=f"teacher {summary['teacher']['arch']}")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return fig

    files = [save(band_plot("acc1", groups, "Validation accuracy (mean, band = min..max over seeds)",
                            "val top-1 (%)", True), "curves.png")]

    # Δ over the grid: α across, every other key (T, method, label fraction) down
    def down(row) -> str:
        return naming.label({k: v for k, v in row["setting"].items() if k != "alpha"})
    alphas = sorted({r["alpha"] for r in summary["rows"]}, key=lambda a: (a is not None, a or 0))
    downs = list(dict.fromkeys(down(r) for r in summary["rows"]))
    grid = np.full((len(downs), len(alphas)), np.nan)
    for row in summary["rows"]:
        if row["delta_final"]["diff"] is not None:
            grid[downs.index(down(row)), alphas.index(row["alpha"])] = 100 * row["delta_final"]["diff"]
    fig, ax = plt.subplots(figsize=(2.4 + 1.4 * len(alphas), 1.4 + 0.6 * len(downs)))
    limit = max(1e-6, np.nanmax(np.abs(grid)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:+.2f}", ha="center", va="center")
    ax.set_xticks(range(len(alphas)), [f"α={_axis(a)}" for a in alphas])
    ax.set_yticks(range(len(downs)), downs)
    ax.set_title("Δ final top-1 vs student-only (pts)")
    fig.colorbar(image, ax=ax)
    files.append(save(fig, "grid.png"))

    if "train_fraction" in summary.get("axes", []):
        files.append(save(_fraction_plot(plt, summary), "fractions.png"))

    distilled = {label: members for label, members in groups.items() if label != "student-only"}
    files.append(save(band_plot("agreement", distilled, "Teacher–student top-1 agreement on val",
                                "agreement with teacher (%)", False), "agreement.png"))
    if summary.get("tradeoff"):
        files.append(save(tradeoff_plot(summary["tradeoff"], plt), "tradeoff.png"))
    return files


def _fraction_plot(plt, summary: dict):
    """Final top-1 against the fraction of training labels: student-only and each distilled setting."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {"student-only": {}}
    for row in summary["rows"]:
        fraction = row["setting"]["train_fraction"]
        lines["student-only"][fraction] = row["student_final"]
        rest = naming.label({k: v for k, v in row["setting"].items() if k != "train_fraction"})
        lines.setdefault(f"distilled {rest}", {})[fraction] = row["distilled_final"]
    for name, points in lines.items():
        xs = sorted(points)
        ax.errorbar([100 * x for x in xs], [100 * points[x]["mean"] for x in xs],
                    yerr=[100 * points[x]["std"] for x in xs], marker="o", capsize=3, label=name)
    if summary["teacher"]["final_acc1"] is not None:
        ax.axhline(100 * summary["teacher"]["final_acc1"], color="k", ls="--", lw=1,
                   label=f"teacher {summary['teacher']['arch']}")
    ax.set_xscale("log")
    ax.set(xlabel="training labels (%)", ylabel="final val top-1 (%)",
           title="Student-only vs distilled by label fraction (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def tradeoff_plot(entries: list[dict], plt):
    """Accuracy against CPU latency, one point per group, seeds as error bars: up and left is better."""
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in entries:
        acc = e["acc1_final"]
        ax.errorbar(e["cpu_b1_ms"], 100 * acc["mean"], yerr=100 * acc["std"], fmt="o", capsize=4,
                    label=f"{e['label']}: {e['arch']}, {e['params'] / 1e6:.2f} M params (n={acc['n']})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set(xlabel=f"CPU latency, batch 1 (ms, log scale; {entries[0]['cpu']})", ylabel="final val top-1 (%)",
           title="Accuracy vs latency (error bars: std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def write_markdown(summary: dict, plots: list[str], source: str, out: Path) -> Path:
    t = summary["teacher"]
    teacher_line = (f"Teacher {t['arch']}: {100 * t['final_acc1']:.2f} % final top-1."
                    if t["final_acc1"] is not None else "")
    text = [
        f"# Distillation report: {source}", "",
        f"{summary['dataset']} at {summary['image_size']} px, {summary['epochs']} epochs; student "
        f"{summary['student_arch']} alone (seeds {summary['student_seeds']}) and distilled. {teacher_line} "
        f"Training time of all runs together: {summary['wall_hours']:.2f} h.", "",
        "## Takeaway", "", takeaway_table(summary), "", *[f"- {line}" for line in verdict(summary)], "",
        "## Takeaway", "", takeaway_table(summary), "",
        *(["## What the student costs", "", tradeoff_table(summary), ""] if summary.get("tradeoff") else []),
        "## Plots", "",
        *[f"![{name[:-4]}]({name})\n" for name in plots],
    ]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def publish_to_wandb(summary: dict, out: Path, plots: list[str], group: str, project: str,
                     entity: str | None) -> list[str]:
    """Logs the table and plots to a `report` run in the group and builds a W&B Report of the group. Returns
    what it did or skipped, one line each."""
    import wandb

    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_logged_in():
        return ["W&B offline: skipped the summary run and the W&B Report; run this again online (logged in, "
                "WANDB_MODE unset) to publish them"]
    done = []
    run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report-{group}",
                     config={"source": str(out)})
    columns = ["method", "alpha", "T", "distilled_final_mean", "distilled_final_std", "student_final_mean",
               "student_final_std", "delta_final", "p_final", "distilled_best_mean", "student_best_mean", "n"]
    table = wandb.Table(columns=columns, data=[[
        r["method"], r["alpha"], r["temperature"], r["distilled_final"]["mean"], r["distilled_final"]["std"],
        r["student_final"]["mean"], r["student_final"]["std"], r["delta_final"]["diff"], r["delta_final"]["p"],
        r["distilled_best"]["mean"], r["student_best"]["mean"], r["distilled_final"]["n"]] for r in summary["rows"]])
    run.log({"report/table": table, **{f"report/{p[:-4]}": wandb.Image(str(out / p)) for p in plots}})
    run.summary["report/markdown"] = (out / "report.md").read_text()
    url = run.url
    run.finish()
    done.append(f"W&B: logged the table and plots to {url}")
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return done + ["W&B Report skipped: pip install wandb-workspaces (or -e '.[report]') to build one"]
    runset = wr.Runset(entity=entity or wandb.Api().default_entity, project=project, name=group,
                       filters=f'Metric("Group") == "{group}"', groupby=["job_type", "method", "alpha", "temperature"])
    report = wr.Report(project=project, entity=entity or wandb.Api().default_entity,
                       title=f"Distillation study {group}",
                       description="distilled vs student-only, generated by python -m kd.report", blocks=[
                           wr.H1(text=f"Did distillation help? ({group})"),
                           wr.MarkdownBlock(text=takeaway_table(summary)),
                           wr.PanelGrid(runsets=[runset], panels=[
                               wr.LinePlot(title="val top-1", x="epoch", y=["val/acc1"],
                                           groupby_aggfunc="mean", groupby_rangefunc="minmax"),
                               wr.LinePlot(title="teacher agreement", x="epoch", y=["val/agreement"],
                                           groupby_aggfunc="mean", groupby_rangefunc="minmax"),
                               wr.LinePlot(title="train loss", y=["train/loss"])]),
                       ])
    report.save()
    return done + [f"W&B Report: {report.url}"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of run output dirs, or a W&B group name (with --wandb-project)")
    parser.add_argument("--out", type=Path, help="where the report goes (default: <source>/report, or "
                        "reports/<group> for a W&B group)")
    parser.add_argument("--wandb-project", default="kd", help="W&B project, for a group or publishing (default: kd)")
    parser.add_argument("--wandb-entity", help="W&B entity")
    parser.add_argument("--wandb-group", help="group to publish to (default: the runs' group or folder name)")
    parser.add_argument("--no-publish", action="store_true", help="write the local report only")
    args = parser.parse_args(argv)
    with user_errors():
        require_matplotlib()
        local = Path(args.source).exists()
        runs = load_local_runs(Path(args.source)) if local else \
            load_wandb_runs(args.source, args.wandb_project, args.wandb_entity)
        out = args.out or (Path(args.source) / "report" if local else Path("reports") / args.source)
        out.mkdir(parents=True, exist_ok=True)
        summary = summarize(runs)
        plots = make_plots(runs, summary, out)
        (out / "results.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
        path = write_markdown(summary, plots, args.source, out)
        print(takeaway_table(summary))
        print("", *verdict(summary), sep="\n")
        if summary.get("tradeoff"):
            print("\n" + tradeoff_table(summary))
        print(f"\nreport: {path}")
        if not args.no_publish:
            group = args.wandb_group or (Path(args.source).name if local else args.source)
            for line in publish_to_wandb(summary, out, plots, group, args.wandb_project, args.wandb_entity):
                print(line)
        return summary


if __name__ == "__main__":
    main()
