"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), as mdistiller trains it:

    loss = CE(student, y) + min(1, epoch / warmup) * T^2 * (alpha * TCKD + beta * NCKD)

TCKD matches the teacher's target-class probability, NCKD its distribution over the other classes
(kd.losses.dkd_loss_terms); plain KD weights NCKD by the teacher's 1 - p_t, which DKD replaces by beta.
"""
from __future__ import annotations

from kd.losses import dkd_loss_terms
from kd.methods.base import TRAIN_LOSS_CE, TRAIN_LOSS_KD, LogitMethod, cross_entropy, part


class DKD(LogitMethod):
    name, paper = "dkd", "Zhao et al. 2022, Decoupled Knowledge Distillation"
    default_temperature = 4.0
    standardized_temperature = 2.0  # Sun et al. 2024 (KD+LS, DKD+LS on CIFAR-100: --base-temp 2)

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: float = 20,
                 logit_standardize: bool = False):
        super().__init__(temperature, logit_standardize)
        self.alpha, self.beta, self.warmup_epochs = alpha, beta, warmup_epochs

    @classmethod
    def add_flags(cls, parser):
        g = parser.add_argument_group("method dkd", cls.paper)
        g.add_argument("--dkd-alpha", type=float, default=1.0, help="weight of TCKD, the target-class term "
                       "(default: 1)")
        g.add_argument("--dkd-beta", type=float, default=8.0, help="weight of NCKD, the non-target term (default: 8)")
        g.add_argument("--dkd-warmup-epochs", type=float, default=20.0, help="the DKD term grows linearly over this "
                       "many epochs, as in the paper; 0 disables (default: 20)")

    @classmethod
    def checks(cls, args):
        return [(args.dkd_alpha >= 0 and args.dkd_beta >= 0, "--dkd-alpha and --dkd-beta must be >= 0"),
                (args.dkd_warmup_epochs >= 0, f"--dkd-warmup-epochs must be >= 0, got {args.dkd_warmup_epochs}")]

    @classmethod
    def from_args(cls, args, student, teacher, image_size):
        return cls(args.dkd_alpha, args.dkd_beta, args.temperature, args.dkd_warmup_epochs, args.logit_standardize)

    def settings(self):
        return {"alpha": self.alpha, "beta": self.beta, "warmup_epochs": self.warmup_epochs, **super().settings()}

    def forward(self, student_logits, teacher_logits, targets, student_features=(), teacher_features=(), epoch=0):
        ce = cross_entropy(student_logits, targets)
        tckd, nckd = dkd_loss_terms(*self.soft_inputs(student_logits, teacher_logits), targets, self.temperature)
        # mdistiller counts epochs from 1: the first epoch already trains with 1 / warmup of the term.
        warmup = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        kd = warmup * (self.alpha * tckd + self.beta * nckd)
        return ce + kd, {TRAIN_LOSS_CE: ce, TRAIN_LOSS_KD: kd, part("tckd"): tckd, part("nckd"): nckd}
