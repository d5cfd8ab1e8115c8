"""An experiment file: reading, checking and resolving it into runs (kd.runs names them), before anything runs.

Every flag is checked against the parser of the script it goes to (train_teacher.py, distill.py) and
kd.config.validate, so a misspelt key or a bad value is one error line naming it.
"""
from __future__ import annotations

import argparse
import difflib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kd import runs as naming
from kd.config import validate
from kd.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"teacher": "train_teacher.py", "student": "distill.py", "distill": "distill.py"}
TOP_KEYS = ("name", "output_dir", "defaults", "teacher", "students")
STUDENT_KEYS = ("baseline", "grid", "seeds")
# Set for each run by kd.experiment: never in the file.
MANAGED = {"output_dir": "set output_dir at the top level of the file", "run_name": "runs are named by kd.runs",
           "wandb_group": "the group is the experiment's name", "resume": "reruns resume by themselves",
           "overwrite": "delete a run's folder to retrain it", "teacher_checkpoint": "use teacher: {checkpoint: PATH}",
           "seed": "use students.seeds (or teacher.seed)"}


@dataclass
class Run:
    name: str
    job: str                      # teacher | student | distill
    flags: list[str]              # the script's flags, output dir and naming included, --resume not
    output_dir: Path
    point: dict = field(default_factory=dict)

    @property
    def script(self) -> str:
        return SCRIPTS[self.job]

    @property
    def finished(self) -> bool:
        return (self.output_dir / "model_final.pt").is_file()


@dataclass
class Experiment:
    name: str
    root: Path
    resolved: dict                # the file with every default filled in: what experiment.yaml stores
    runs: list[Run]
    teacher_checkpoint: str | None = None  # a teacher reused from elsewhere (teacher: {checkpoint: ...})

    @property
    def teacher(self) -> Run | None:
        return next((r for r in self.runs if r.job == "teacher"), None)

    @property
    def students(self) -> list[Run]:
        return [r for r in self.runs if r.job != "teacher"]


def script_parser(script: str) -> argparse.ArgumentParser:
    import importlib
    import sys
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(Path(script).stem).build_parser()


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _not_a_flag(where: str, key: str, known, script: str) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"see python {script} --help"
    return UserError(f"{where}: {key!r} is not a flag of {script}: {hint}")


def to_argv(where: str, flags: dict, script: str) -> list[str]:
    """{key: value} (keys are the long flag names without '--', dashes or underscores) -> argv."""
    options = _options(script_parser(script))
    argv = []
    for raw_key, value in flags.items():
        key = str(raw_key).replace("-", "_")
        if key in MANAGED:
            raise UserError(f"{where}: {raw_key!r} is set by kd.experiment: {MANAGED[key]}")
        if key not in options:
            raise _not_a_flag(where, str(raw_key), options, script)
        action = options[key]
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            _check(isinstance(value, bool), where, raw_key, "true or false")
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            _check(isinstance(value, bool), where, raw_key, "true or false")
            if value != action.default:
                argv.append(flag)
        elif action.nargs in ("*", "+"):
            values = value if isinstance(value, list) else [value]
            argv += [flag, *map(str, values)]
        else:
            _check(value is not None and not isinstance(value, (list, dict)), where, raw_key, "one value")
            argv += [flag, naming.format_value(value) if isinstance(value, bool) else str(value)]
    return argv


def _check(ok: bool, where: str, key, what: str) -> None:
    if not ok:
        raise UserError(f"{where}: {key} must be {what}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad value: one line naming the run, not argparse's usage text
        raise UserError(message)


def check_flags(run: Run) -> None:
    """Parses the run's flags with its script's own parser and kd.config.validate, as the script will."""
    parser = script_parser(run.script)
    checker = _Parser(add_help=False, parents=[parser])
    try:
        args = checker.parse_args(run.flags)
        validate(args)
        from kd.models import family  # a model name the parser takes as any string
        family(getattr(args, "arch", None) or args.student_arch)
    except UserError as exc:
        raise UserError(f"run {run.name} ({run.script}): {exc}") from None


def _section(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}{key}: must be a mapping of keys to values, got {value!r}")
    return value


def _grids(grid, where: str) -> list[dict]:
    """students.grid: one mapping of keys to value lists, or a list of them (their runs' union, e.g. KD with and
    without logit standardization next to DKD without it). Keys normalised to argparse dests."""
    if grid is None:
        return []
    example = "e.g. grid: {alpha: [0.1, 0.5]}, or leave grid out for one distilled setting"
    if isinstance(grid, list) and not where.endswith("]"):
        if not grid:
            raise UserError(f"{where} is an empty list: give it one or more mappings, {example}")
        return [g for i, sub in enumerate(grid) for g in _grids(sub, f"{where}[{i}]")]
    if not isinstance(grid, dict):
        raise UserError(f"{where} must be a mapping of keys to value lists (or a list of such mappings), got "
                        f"{grid!r}: {example}")
    if not grid:
        raise UserError(f"{where} is empty: give each key a list of values, {example}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{key}: must be a non-empty list of values, got {values!r}")
        if str(key).replace("-", "_") in MANAGED:
            raise UserError(f"{where}.{key}: set by kd.experiment: {MANAGED[str(key).replace('-', '_')]}")
    return [{str(k).replace("-", "_"): v for k, v in grid.items()}]


def _resolved_grid(grids: list[dict]) -> dict:
    return {} if not grids else {"grid": grids[0] if len(grids) == 1 else grids}


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def apply_override(doc: dict, assignment: str) -> None:
    """--set students.seeds=[0,1]: a dotted key and a YAML value."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment}: write KEY=VALUE, e.g. --set defaults.data_dir=~/data/imagewoof2-160")
    *parents, last = key.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {assignment}: {part} is not a mapping in the file")
    node[last] = yaml.safe_load(value)


def load(path: str | Path, overrides: list[str] = ()) -> Experiment:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the experiment file {path} ({exc.strerror}): pass an existing file, "
                        f"e.g. experiments/smoke.yaml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
        raise UserError(f"{path} is not valid YAML{where}: {problem}: fix the file") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: an experiment file is a mapping with {', '.join(TOP_KEYS)}")
    for assignment in overrides:
        apply_override(doc, assignment)
    return resolve(doc, path)


def resolve(doc: dict, path: Path) -> Experiment:
    where = f"{path}: "
    for key in doc:
        if key not in TOP_KEYS:
            raise UserError(f"{where}unknown key {key!r}: the file's keys are {', '.join(TOP_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise UserError(f"{where}name: give the experiment a name (a word, no '/'): it is the W&B group and the "
                        f"default output folder runs/<name>")
    root = Path(doc.get("output_dir") or f"runs/{name}").expanduser().resolve()
    defaults = _section(doc, "defaults", where)
    teacher = dict(_section(doc, "teacher", where))
    students = dict(_section(doc, "students", where))
    if not students:
        raise UserError(f"{where}students: say which students to train (student_arch, grid, seeds)")

    common = dict(defaults)
    tags = lambda job: ["--wandb-group", name, "--wandb-tags", name, job]  # noqa: E731
    runs: list[Run] = []
    checkpoint = teacher.pop("checkpoint", None)
    if checkpoint is not None:
        if teacher:
            raise UserError(f"{where}teacher: with checkpoint, nothing else is trained: remove "
                            f"{', '.join(map(repr, teacher))}")
        teacher_ref = str(checkpoint)
    else:
        teacher_seed = teacher.pop("seed", 0)
        argv = (to_argv(f"{where}defaults", common, "train_teacher.py")
                + to_argv(f"{where}teacher", teacher, "train_teacher.py"))
        out = root / "teacher"
        runs.append(Run("teacher", "teacher", argv + ["--seed", str(teacher_seed), "--output-dir", str(out),
                                                      "--run-name", "teacher", *tags("teacher")], out))
        teacher_ref = str(out)

    baseline = students.pop("baseline", True)
    grid = students.pop("grid", None)
    seeds = students.pop("seeds", [0])
    _check(isinstance(baseline, bool), f"{where}students", "baseline", "true or false")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise UserError(f"{where}students.seeds: must be a non-empty list of integers, got {seeds!r}")
    grids = _grids(grid, f"{where}students.grid")
    student_flags = {str(k).replace("-", "_"): v for k, v in {**common, **students}.items()}
    distill_defaults = {a.dest: a.default for a in _options(script_parser("distill.py")).values()}
    # the students' own distillation flags (method, alpha, temperature, logit_standardize, ...): what names resolve
    distill_defaults.update({k: v for k, v in student_flags.items() if k in naming.distill_keys()})
    baselines, distilled = naming.union_points(grids, distill_defaults)
    gridded = {k for g in grids for k in g}
    base_argv = to_argv(f"{where}students", student_flags, "distill.py")
    for seed in seeds:
        jobs = ([("student", p) for p in baselines] if baseline else []) + [("distill", p) for p in distilled]
        for job, point in jobs:
            run_name = naming.run_name(job, point, seed)
            out = root / run_name
            # the point's own values: a gridded key, or alpha/temperature already among the student flags
            own = {k: v for k, v in point.items() if k in gridded}
            argv = base_argv + to_argv(f"{where}students.grid", own, "distill.py") + [
                "--teacher-checkpoint", "none" if job == "student" else teacher_ref, "--seed", str(seed),
                "--output-dir", str(out), "--run-name", run_name, *tags(job)]
            runs.append(Run(run_name, job, argv, out, {**point, "seed": seed}))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{where}students.grid gives two runs the same name ({', '.join(duplicates)}): list each "
                        f"value once")
    if not any(r.job != "teacher" for r in runs):
        raise UserError(f"{where}students: no student run (baseline false and no distilled setting)")
    for run in runs:
        check_flags(run)
    resolved = {"name": name, "output_dir": str(root), "defaults": defaults,
                "teacher": {"checkpoint": teacher_ref} if checkpoint is not None else
                {**teacher, "seed": teacher_seed},
                "students": {**students, "baseline": baseline, **_resolved_grid(grids), "seeds": seeds}}
    return Experiment(name, root, resolved, runs, teacher_checkpoint=teacher_ref if checkpoint is not None else None)


def write_record(exp: Experiment, source: Path) -> Path:
    """<root>/experiment.yaml: the resolved file, the git commit, and every run's script and flags (what the
    Slurm array tasks read back)."""
    exp.root.mkdir(parents=True, exist_ok=True)
    record = {**exp.resolved, "source": str(Path(source).resolve()), "git": git_commit(),
              "runs": [{"name": r.name, "script": r.script, "flags": r.flags} for r in exp.runs]}
    path = exp.root / "experiment.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False, width=120))
    return path


def read_record(path: Path, name: str) -> tuple[str, list[str]]:
    """The script and flags of run `name` in an experiment.yaml that write_record wrote."""
    record = yaml.safe_load(Path(path).read_text())
    for run in record["runs"]:
        if run["name"] == name:
            return run["script"], run["flags"]
    raise UserError(f"{path} has no run named {name!r}")
