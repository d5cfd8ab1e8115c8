"""Hinton's knowledge distillation (Hinton et al. 2015): kd's default method and its behaviour before methods.

    loss = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
"""
from __future__ import annotations

from kd.losses import KL_REDUCTIONS, kd_loss_terms
from kd.methods.base import TRAIN_LOSS_CE, TRAIN_LOSS_KD, LogitMethod, cross_entropy


class KD(LogitMethod):
    name, paper = "kd", "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    default_temperature = 7.0
    standardized_temperature = 2.0  # Sun et al. 2024 (KD+LS, DKD+LS on CIFAR-100: --base-temp 2)

    def __init__(self, alpha: float = 0.1, temperature: float = 7.0, kl_reduction: str = "batchmean",
                 logit_standardize: bool = False):
        super().__init__(temperature, logit_standardize)
        self.alpha, self.kl_reduction = alpha, kl_reduction

    @classmethod
    def add_flags(cls, parser):
        g = parser.add_argument_group("method kd", cls.paper)
        g.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label loss; the soft (teacher) "
                       "loss gets 1 - alpha (default: 0.1)")
        g.add_argument("--kl-reduction", default="batchmean", choices=KL_REDUCTIONS, help="batchmean: the true KL "
                       "per sample; mean: divide by batch x classes, as the knowledge-distillation-pytorch reference "
                       "code does (default: batchmean)")

    @classmethod
    def checks(cls, args):
        return [(0.0 <= args.alpha <= 1.0, f"--alpha must be in [0, 1] (the hard-label weight), got {args.alpha}")]

    @classmethod
    def from_args(cls, args, student, teacher, image_size):
        return cls(args.alpha, args.temperature, args.kl_reduction, args.logit_standardize)

    def settings(self):
        return {"alpha": self.alpha, "kl_reduction": self.kl_reduction, **super().settings()}

    def forward(self, student_logits, teacher_logits, targets, student_features=(), teacher_features=(), epoch=0):
        if self.logit_standardize:
            ce = cross_entropy(student_logits, targets)  # the hard labels see the raw logits
            _, kd = kd_loss_terms(*self.soft_inputs(student_logits, teacher_logits), targets, self.temperature,
                                  self.kl_reduction)
        else:
            ce, kd = kd_loss_terms(student_logits, teacher_logits, targets, self.temperature, self.kl_reduction)
        loss = self.alpha * ce + (1.0 - self.alpha) * kd
        return loss, {TRAIN_LOSS_CE: ce, TRAIN_LOSS_KD: kd}
