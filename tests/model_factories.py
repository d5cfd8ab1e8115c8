"""Model factories named as package.module:callable in tests (what a user passes as --arch)."""
import torch
import torchvision
from torch import nn


def tiny_vit(num_classes: int, image_size: int = 64) -> nn.Module:
    """torchvision's VisionTransformer at a size that trains in seconds (2 layers, width 32)."""
    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=num_classes)


class SmallNet(nn.Module):
    """A user's own network with data-dependent control flow, which fx cannot trace: it runs eagerly."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-1] > 8:  # a shape test: symbolic tracing refuses it
            x = nn.functional.avg_pool2d(x, 2)
        return self.classifier(x.mean((2, 3)))


def small_net(num_classes: int) -> nn.Module:
    return SmallNet(num_classes)


def not_a_model(num_classes: int):
    return "a string"


class EigenNet(nn.Module):
    """A network with an operator ONNX cannot express (torch.linalg.eigvals): kd.export must name it."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.linalg.eigvals(x[:, :, :3, :3]).real.mean(-1))


def eigen_net(num_classes: int) -> nn.Module:
    return EigenNet(num_classes)


class OutOfMemoryNet(SmallNet):
    """SmallNet whose 7th training forward (2nd step of epoch 2 at batch 128) raises what CUDA raises when a batch does not fit (CPU tests)."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            if self.forwards == 7:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 3.12 GiB is free.\nmore detail")
        return super().forward(x)


def out_of_memory_net(num_classes: int) -> nn.Module:
    return OutOfMemoryNet(num_classes)
