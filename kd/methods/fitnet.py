"""FitNets (Romero et al., ICLR 2015) as mdistiller trains it: one stage, jointly with cross-entropy.

    loss = CE(student, y) + weight * MSE(regressor(student feature map), teacher feature map)

The regressor (1x1 conv + batch norm + ReLU, mdistiller's ConvReg for equal sizes) is a trainable part of the
method: it trains with the student and lives in the training-state checkpoint, not in the student's model file.
"""
from __future__ import annotations

from torch import nn

from kd.features import feature_shapes
from kd.losses import hint_loss
from kd.methods.base import TRAIN_LOSS_CE, TRAIN_LOSS_KD, FeatureMethod, cross_entropy, layer_pairs, require_teacher


def regressor(student_channels: int, teacher_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                         nn.BatchNorm2d(teacher_channels), nn.ReLU(inplace=True))


class FitNet(FeatureMethod):
    name, paper = "fitnet", "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"

    def __init__(self, student_layers: list[str], teacher_layers: list[str], student_channels: list[int],
                 teacher_channels: list[int], weight: float = 100.0):
        super().__init__(student_layers, teacher_layers)
        self.weight = weight
        self.regressors = nn.ModuleList(regressor(s, t) for s, t in zip(student_channels, teacher_channels))

    @classmethod
    def for_models(cls, student: nn.Module, teacher: nn.Module, image_size: int, layers: list[str] | None = None,
                   weight: float = 100.0) -> "FitNet":
        """Regressors sized from one probe image through both models; `layers` as --feature-layers."""
        student_layers, teacher_layers = layer_pairs(layers, student, teacher, image_size)
        s = [shape[1] for shape in feature_shapes(student, student_layers, image_size)]
        t = [shape[1] for shape in feature_shapes(teacher, teacher_layers, image_size)]
        return cls(student_layers, teacher_layers, s, t, weight)

    @classmethod
    def add_flags(cls, parser):
        g = parser.add_argument_group("method fitnet", cls.paper)
        g.add_argument("--fitnet-weight", type=float, default=100.0, help="weight of the hint (feature MSE) loss, "
                       "mdistiller's (default: 100)")

    @classmethod
    def checks(cls, args):
        return [(args.fitnet_weight >= 0, f"--fitnet-weight must be >= 0, got {args.fitnet_weight}")]

    @classmethod
    def from_args(cls, args, student, teacher, image_size):
        require_teacher(cls.name, teacher)
        return cls.for_models(student, teacher, image_size, args.feature_layers, args.fitnet_weight)

    def settings(self):
        return {"weight": self.weight, **super().settings()}

    def forward(self, student_logits, teacher_logits, targets, student_features=(), teacher_features=(), epoch=0):
        ce = cross_entropy(student_logits, targets)
        hint = sum(hint_loss(reg(s), t) for reg, s, t in zip(self.regressors, student_features, teacher_features))
        kd = self.weight * hint
        return ce + kd, {TRAIN_LOSS_CE: ce, TRAIN_LOSS_KD: kd}
