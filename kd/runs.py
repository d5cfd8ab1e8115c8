"""Runs of an experiment: the one naming rule and the grid expansion, used by kd.experiment (output folders,
W&B run names, Slurm array tasks) and kd.report (which runs are seeds of one setting, which baseline a
distilled setting is compared with, and the setting's label).

A name is the job, then the run's point on the grid, then the seed:

    teacher            student-s0            distill-a0.1-T4-s0
    student-f0.05-s1   distill-kd-a0.1-T4-f0.05-s1   distill-dkd-T4-s2   distill-fitnet-s0   (method gridded)

alpha and temperature are always in a distilled run's name where its method uses them (kd: both; dkd, dist: T;
fitnet, at: neither), every other gridded key when it is gridded; a baseline (student-only) run carries only the
gridded keys that are not distillation settings.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Iterable

from kd.methods import DEFAULT_METHOD, KD, METHODS

# A key's short form in names and labels; any other key appears as its flag name, e.g. `lr0.05`.
SHORT = {"method": "", "alpha": "a", "temperature": "T", "train_fraction": "f", "seed": "s", "logit_standardize": "ls"}
LABEL = {"alpha": "α", "temperature": "T", "train_fraction": "labels", "logit_standardize": "LS"}
# distill.py settings that a student-only run does not have (its alpha/temperature in config.json are unused
# defaults): these and every flag of kd.config's distillation groups (see distill_keys); a gridded key outside
# them applies to the baseline too (e.g. train_fraction).
DISTILL_KEYS = frozenset({"method", "alpha", "temperature", "kl_reduction", "teacher_checkpoint", "teacher_cache"})
ALWAYS_NAMED = ("alpha", "temperature")  # in every distilled run's name (where its method uses them), gridded or not


def named_axes(method: str | None) -> tuple[str, ...]:
    """The ALWAYS_NAMED keys the method uses (kd.methods.method_axes)."""
    uses = METHODS.get(method or DEFAULT_METHOD)
    return tuple(k for k in ALWAYS_NAMED if uses is None or (k == "alpha" and uses is KD)
                 or (k == "temperature" and uses.default_temperature is not None))


# Flags that differ between runs of one setting without changing what is trained (or say where it goes).
NOT_A_SETTING = frozenset({"seed", "output_dir", "run_name", "resume", "overwrite", "teacher_checkpoint",
                           "teacher_cache", "wandb_group", "wandb_tags", "wandb_project", "wandb_entity", "data_dir",
                           "packed_dir", "workers", "report_to", "log_every", "checkpoint_every", "keep_checkpoints",
                           "dist_timeout"})


def format_value(value) -> str:
    """0.1 -> '0.1', 4.0 -> '4', 1e-05 -> '1e-05', True -> 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def name_part(key: str, value) -> str:
    """alpha 0.1 -> 'a0.1'; a switch by its name alone: logit_standardize true -> 'ls', false -> 'no-ls'."""
    short = SHORT.get(key, key.replace('_', '-'))
    if isinstance(value, bool):
        return short if value else f"no-{short}"
    return f"{short}{format_value(value)}"


def run_name(job: str, point: dict, seed=None) -> str:
    """`job`, the point's keys in their order, then `s<seed>`: student-f0.05-s0, distill-a0.1-T4-s1."""
    parts = [job, *(name_part(k, v) for k, v in point.items())]
    if seed is not None:
        parts.append(name_part("seed", seed))
    return "-".join(parts)


def label(point: dict) -> str:
    """A setting for people: 'α=0.1 T=4', 'dkd α=0.1 T=4 labels=0.05'."""
    def part(k, v):
        if k == "method":
            return format_value(v)
        if isinstance(v, bool):
            return LABEL.get(k, k) if v else f"no {LABEL.get(k, k)}"
        return f"{LABEL.get(k, k)}={format_value(v)}"
    return " ".join(part(k, v) for k, v in point.items())


def expand_grid(grid: dict) -> list[dict]:
    """Every combination of the grid's value lists, the first key varying slowest: {a: [1, 2], b: [3]} ->
    [{a: 1, b: 3}, {a: 2, b: 3}]."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def student_points(grid: dict, distill_defaults: dict) -> tuple[list[dict], list[dict]]:
    """(baseline points, distilled points) of a students' grid: a baseline point per combination of the
    non-distillation keys; a distilled point per combination of all keys, alpha and temperature always
    present (from `distill_defaults` when not gridded), ordered method, alpha, temperature, then the rest."""
    shared = {k: v for k, v in grid.items() if k not in distill_keys()}
    baselines = expand_grid(shared)
    distilled = []
    for point in expand_grid(grid):
        ordered = {k: point[k] for k in ("method",) if k in point}
        method = point.get("method", distill_defaults.get("method"))
        for k in named_axes(method):
            value = point.get(k, distill_defaults.get(k))
            if k == "temperature" and value is None:  # --temperature unset: the method's own
                standardize = point.get("logit_standardize", distill_defaults.get("logit_standardize"))
                value = METHODS[method or DEFAULT_METHOD].temperature_default(bool(standardize))
            ordered[k] = value
        ordered.update({k: v for k, v in point.items() if k not in ordered and k not in ALWAYS_NAMED})
        # A grid key the method does not use (alpha for DKD) must not multiply its runs; a value listed twice
        # is kept, so that the file's validation names the clash.
        if ordered not in distilled or set(point) <= set(ordered):
            distilled.append(ordered)
    return baselines, distilled


def union_points(grids: list[dict], distill_defaults: dict) -> tuple[list[dict], list[dict]]:
    """student_points over several grids: their points in order, each run once (no grid: one distilled
    setting). Points are the same run when they train the same way: a key one point lacks takes its default,
    so {method: kd, logit_standardize: false} from one grid is {method: kd} from another (the first name wins)."""
    per_grid = [student_points(grid, distill_defaults) for grid in grids or [{}]]
    keys = {k for base, dist in per_grid for p in (*base, *dist) for k in p}

    def effective(point: dict) -> dict:
        filled = {k: point.get(k, distill_defaults.get(k)) for k in keys}
        filled["method"] = filled.get("method") or DEFAULT_METHOD
        return filled

    baselines, distilled = [], []
    for base, dist in per_grid:
        # within one grid a value listed twice is kept, so that the file's validation names the clash
        seen_base, seen_dist = [effective(p) for p in baselines], [effective(p) for p in distilled]
        baselines += [p for p in base if effective(p) not in seen_base]
        distilled += [p for p in dist if effective(p) not in seen_dist]
    return baselines, distilled


# ---------------------------------------------------------------- reading runs back (kd.report)
def varying_keys(configs: Iterable[dict]) -> list[str]:
    """The settings (flags) whose value differs between these runs' configs, in first-seen order."""
    configs = list(configs)
    keys = list(dict.fromkeys(k for c in configs for k in c))
    flags = _flag_names()
    return [k for k in keys if k in flags and k not in NOT_A_SETTING
            and len({repr(c.get(k)) for c in configs}) > 1]


def settings(config: dict, varying: list[str]) -> tuple[dict, dict]:
    """(shared, distill) setting of a run: its values of the varying non-distillation keys (what its baseline
    must match), and for a distilled run its method (when varying), alpha, temperature and other varying
    distillation keys."""
    shared = {k: config.get(k) for k in varying if k not in distill_keys()}
    if config.get("job_type") != "distill":
        return shared, {}
    method = config.get("method") or DEFAULT_METHOD  # runs from before methods existed are kd
    # logit standardization is a variant of the method (kd+ls, as kd.methods.method_label says), not an axis
    label = method + ("+ls" if config.get("logit_standardize") else "")
    distill = {"method": label} if {"method", "logit_standardize"} & set(varying) else {}
    named = named_axes(method)
    distill.update({k: config.get(k) for k in named})
    # other varying distillation settings, less the axes this method does not use and flags a run lacks
    distill.update({k: config.get(k) for k in varying if k in distill_keys() and k not in distill
                    and k != "logit_standardize" and (k not in ALWAYS_NAMED or k in named)
                    and config.get(k) is not None})
    return shared, distill


def teacher_dir(config: dict) -> Path | None:
    """The output dir of a distilled run's teacher: its --teacher-checkpoint itself, or a model file's folder;
    None for a student-only run (paths as they were given, so relative to where the run was started)."""
    ref = config.get("teacher_checkpoint")
    if not ref or str(ref).lower() == "none":
        return None
    path = Path(str(ref)).expanduser()
    return path if path.is_dir() else path.parent


@functools.cache
def _flag_names() -> frozenset:
    """Every train_teacher.py / distill.py setting by its config.json key (argparse dest)."""
    import argparse

    from kd.config import add_distill_flags, common_parser
    parser = argparse.ArgumentParser(parents=[common_parser()], add_help=False)
    add_distill_flags(parser)
    return frozenset({a.dest for a in parser._actions} | {"arch", "student_arch", "method"})


@functools.cache
def distill_keys() -> frozenset:
    """DISTILL_KEYS and every flag that kd.config.add_distill_flags adds (a method's own settings included)."""
    import argparse

    from kd.config import add_distill_flags
    parser = argparse.ArgumentParser(add_help=False)
    add_distill_flags(parser)
    return DISTILL_KEYS | {a.dest for a in parser._actions}
