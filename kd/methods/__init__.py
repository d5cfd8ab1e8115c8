"""Distillation methods, one file each, registered by name in METHODS (what --method chooses).

    from kd.methods import DKD
    loss, parts = DKD()(student_logits, teacher_logits, targets, epoch=epoch)

To add one: a Method subclass in its own file (kd/methods/base.py says what it declares) and a line below.
"""
from __future__ import annotations

import argparse

from kd.methods.at import AT
from kd.methods.base import FeatureMethod, LogitMethod, Method, layer_pairs
from kd.methods.dist import DIST
from kd.methods.dkd import DKD
from kd.methods.fitnet import FitNet
from kd.methods.kd import KD

METHODS: dict[str, type[Method]] = {m.name: m for m in (KD, DKD, DIST, FitNet, AT)}
DEFAULT_METHOD = "kd"


def add_method_flags(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> None:
    """--method and the flags every method shares (in `group`), then each method's own group."""
    logit = [n for n, m in METHODS.items() if m.default_temperature is not None]
    group.add_argument("--method", default=DEFAULT_METHOD, choices=tuple(METHODS),
                       help=f"distillation method: {', '.join(METHODS)} (default: {DEFAULT_METHOD}); see the "
                       "method groups below for each one's flags")
    group.add_argument("--temperature", type=float, help="softmax temperature T of the logit methods (default: the "
                       "method's paper value: " + ", ".join(f"{n} {METHODS[n].default_temperature:g}" for n in logit)
                       + "; with --logit-standardize " + ", ".join(f"{n} {m.standardized_temperature:g}" for n, m in
                                                                  METHODS.items() if m.standardized_temperature)
                       + ")")
    group.add_argument("--logit-standardize", action="store_true", help="standardize each sample's student and "
                       f"teacher logits (z - mean) / std before the temperature softmax (Sun et al. 2024); for "
                       f"{', '.join(logit)}")
    group.add_argument("--feature-layers", nargs="+", metavar="LAYER[:TEACHER_LAYER]", help="feature methods "
                       "(fitnet, at): the student modules whose outputs are distilled, each paired with the "
                       "teacher module of the same name or the one after a colon (default: each model's last "
                       "feature map before global pooling, e.g. layer4 of a torchvision ResNet)")
    for method in METHODS.values():
        method.add_flags(parser)


def method_flag_names() -> frozenset[str]:
    """The config.json keys (argparse dests) of --method and every method's flags: distillation settings."""
    parser = argparse.ArgumentParser(add_help=False)
    add_method_flags(parser, parser.add_argument_group("methods"))
    return frozenset(a.dest for a in parser._actions if a.option_strings)


def method_checks(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """Resolves --temperature to the method's default, and the checks of the method's flags."""
    method = METHODS[args.method]
    if args.temperature is None:
        args.temperature = method.temperature_default(args.logit_standardize)
    return [
        (args.temperature is None or args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (not (method.uses_features and getattr(args, "teacher_cache", None)),
         f"--method {args.method} distills feature maps, which a teacher cache does not hold: drop --teacher-cache "
         f"(the teacher runs live) or use a logit method (kd, dkd, dist)"),
        (not (args.logit_standardize and method.default_temperature is None),
         f"--logit-standardize applies to logit methods, not to --method {args.method}"),
        *method.checks(args),
    ]


def build_method(args: argparse.Namespace, student, teacher, image_size: int) -> Method:
    """The method --method names, from its flags; `teacher` is None when distilling from a cache."""
    return METHODS[args.method].from_args(args, student, teacher, image_size)


def method_label(config: dict) -> str | None:
    """The method of a run's config.json as reports show it: kd, kd+ls, dkd, ...; None for runs without one."""
    name = config.get("method", DEFAULT_METHOD if config.get("job_type") == "distill" else None)
    if name is None:
        return None
    return name + ("+ls" if config.get("logit_standardize") else "")


def method_axes(config: dict) -> tuple[float | None, float | None]:
    """(alpha, temperature) of a run's config.json where its method uses them, else None each: the axes next to
    the method in kd.compare and kd.report (kd uses both, dkd and dist only T, feature methods neither)."""
    label = method_label(config)
    if label is None:
        return None, None
    method = METHODS.get(label.split("+")[0])
    alpha = config.get("alpha") if method is KD else None
    temperature = config.get("temperature") if method is not None and method.default_temperature else None
    return alpha, temperature


__all__ = ["AT", "DIST", "DKD", "FitNet", "KD", "METHODS", "FeatureMethod", "LogitMethod", "Method",
           "add_method_flags", "build_method", "method_flag_names", "layer_pairs", "method_axes", "method_checks", "method_label"]
