"""DIST (Huang et al., NeurIPS 2022): match the teacher's inter- and intra-class relations (Pearson correlations
of the softened predictions) rather than its probabilities (kd.losses.dist_loss).

    loss = CE(student, y) + T^2 * (beta * inter-class + gamma * intra-class)
"""
from __future__ import annotations

from kd.losses import dist_loss_terms
from kd.methods.base import TRAIN_LOSS_CE, TRAIN_LOSS_KD, LogitMethod, cross_entropy, part


class DIST(LogitMethod):
    name, paper = "dist", "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher"
    default_temperature = 1.0

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
                 logit_standardize: bool = False):
        super().__init__(temperature, logit_standardize)
        self.beta, self.gamma = beta, gamma

    @classmethod
    def add_flags(cls, parser):
        g = parser.add_argument_group("method dist", cls.paper)
        g.add_argument("--dist-beta", type=float, default=1.0, help="weight of the inter-class relation, per sample "
                       "across classes (default: 1)")
        g.add_argument("--dist-gamma", type=float, default=1.0, help="weight of the intra-class relation, per class "
                       "across the batch (default: 1)")

    @classmethod
    def checks(cls, args):
        return [(args.dist_beta >= 0 and args.dist_gamma >= 0, "--dist-beta and --dist-gamma must be >= 0")]

    @classmethod
    def from_args(cls, args, student, teacher, image_size):
        return cls(args.dist_beta, args.dist_gamma, args.temperature, args.logit_standardize)

    def settings(self):
        return {"beta": self.beta, "gamma": self.gamma, **super().settings()}

    def forward(self, student_logits, teacher_logits, targets, student_features=(), teacher_features=(), epoch=0):
        ce = cross_entropy(student_logits, targets)
        inter, intra = dist_loss_terms(*self.soft_inputs(student_logits, teacher_logits), self.temperature)
        kd = self.beta * inter + self.gamma * intra
        return ce + kd, {TRAIN_LOSS_CE: ce, TRAIN_LOSS_KD: kd, part("inter"): inter, part("intra"): intra}
