"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as mdistiller trains it:

    loss = CE(student, y) + weight * sum over layer pairs of mean((q_s - q_t)^2)

with q the L2-normalised channel mean of f^p (kd.losses.at_loss). No trainable parts.
"""
from __future__ import annotations

from kd.losses import at_loss
from kd.methods.base import TRAIN_LOSS_CE, TRAIN_LOSS_KD, FeatureMethod, cross_entropy, layer_pairs, require_teacher


class AT(FeatureMethod):
    name, paper = "at", "Zagoruyko & Komodakis 2017, Paying More Attention to Attention"

    def __init__(self, student_layers: list[str], teacher_layers: list[str], weight: float = 1000.0, p: float = 2.0):
        super().__init__(student_layers, teacher_layers)
        self.weight, self.p = weight, p

    @classmethod
    def add_flags(cls, parser):
        g = parser.add_argument_group("method at", cls.paper)
        g.add_argument("--at-weight", type=float, default=1000.0, help="weight of the attention loss, mdistiller's "
                       "(default: 1000)")
        g.add_argument("--at-p", type=float, default=2.0, help="attention map = channel mean of |f|^p (default: 2)")

    @classmethod
    def checks(cls, args):
        return [(args.at_weight >= 0, f"--at-weight must be >= 0, got {args.at_weight}"),
                (args.at_p > 0, f"--at-p must be > 0, got {args.at_p}")]

    @classmethod
    def from_args(cls, args, student, teacher, image_size):
        require_teacher(cls.name, teacher)
        return cls(*layer_pairs(args.feature_layers, student, teacher, image_size), args.at_weight, args.at_p)

    def settings(self):
        return {"weight": self.weight, "p": self.p, **super().settings()}

    def forward(self, student_logits, teacher_logits, targets, student_features=(), teacher_features=(), epoch=0):
        ce = cross_entropy(student_logits, targets)
        kd = self.weight * sum(at_loss(s, t, self.p) for s, t in zip(student_features, teacher_features))
        return ce + kd, {TRAIN_LOSS_CE: ce, TRAIN_LOSS_KD: kd}
