"""Batched augmentation on the training device, for packed uint8 images (kd.packed).

A view of an image is its crop box and flip, one int row [x0, y0, w, h, flip] in the pixels of the packed square.
Views are drawn with torchvision's RandomResizedCrop sampling (scale 0.08-1, aspect 3/4-4/3, 10 attempts, then
the whole image) + a fair flip, from a counter-based hash of (seed, epoch, sample index) instead of a stateful
generator: the same sample gets the same view in the same epoch whatever the number of processes, batch order or
a resume, so nothing needs checkpointing, and kd.teacher_cache can store and replay views exactly.

Rendering a batch of views is two batched matmuls: per sample, a (out x S) resampling matrix for rows and one for
columns holding the same antialiased bilinear weights as torchvision's `resized_crop(..., antialias=True)` (PIL's
filter), restricted to the crop box; the flip reverses the column matrix. Output is normalized float, NCHW in
channels_last memory order (what the convolutions want), on the device the images are on.
"""
from __future__ import annotations

import math

import torch

_M32, _M16 = 0xFFFFFFFF, 0xFFFF
ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before falling back to the whole image
DRAWS = 4 * ATTEMPTS + 1  # per attempt: area, log-ratio, top, left; then the flip


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (int64 tensor or int), in halves so nothing overflows int64."""
    return ((x & _M16) * c + ((((x >> 16) * c) & _M16) << 16)) & _M32


def _mix32(x):
    """murmur3's 32-bit finalizer: a bijection whose output bits all depend on all input bits. Works on int64
    tensors and on Python ints alike, so keys are mixed on the host without creating device tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def hash_uniform(indices: torch.Tensor, key: int, draws: int) -> torch.Tensor:
    """(len(indices), draws) float32 in [0, 1), a pure function of (key, index, draw number)."""
    base = _mix32((indices.long() & _M32) ^ _mix32(key & _M32))
    salt = _mix32(torch.arange(draws, device=indices.device, dtype=torch.long) * 0x9E3779B9 & _M32)
    return (_mix32(base[:, None] ^ salt) >> 8).float() / float(1 << 24)


def stream_key(seed: int, *stream: int) -> int:
    """One 32-bit key per (seed, epoch) or (seed, cache view k): keys of different streams never collide in
    practice, and hash_uniform mixes them with the sample index."""
    key = seed & _M32
    for part in stream:
        key = _mix32((key * 31 + part + 0x632BE5AB) & _M32)
    return key


def sample_views(indices: torch.Tensor, key: int, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes + flips for square `size` px images: (B, 5) long [x0, y0, w, h, flip]."""
    u = hash_uniform(indices, key, DRAWS)
    area = size * size * (scale[0] + (scale[1] - scale[0]) * u[:, 0:ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, ATTEMPTS:2 * ATTEMPTS])
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    valid = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    top = (u[:, 2 * ATTEMPTS:3 * ATTEMPTS] * (size - h + 1)).long()
    left = (u[:, 3 * ATTEMPTS:4 * ATTEMPTS] * (size - w + 1)).long()
    first = torch.where(valid.any(1), valid.long().argmax(1), -1)  # the first box that fits, as torchvision
    pick = first.clamp(min=0)[:, None]
    found = first[:, None] >= 0
    whole = torch.zeros_like(pick)  # fallback: for a square image the ratio clamp keeps the whole image
    x0 = torch.where(found, left.gather(1, pick), whole)
    y0 = torch.where(found, top.gather(1, pick), whole)
    bw = torch.where(found, w.gather(1, pick), whole + size)
    bh = torch.where(found, h.gather(1, pick), whole + size)
    flip = (u[:, -1:] < 0.5).long()
    return torch.cat([x0, y0, bw, bh, flip], dim=1)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """(B, out, size): antialiased bilinear weights mapping input pixels [start, start + length) onto `out`
    pixels, torchvision/PIL's formula (`_upsample_bilinear2d_aa`): triangle filter widened by the downscale."""
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    scale = length / out
    support = torch.clamp(scale, min=1.0)  # bilinear support 1, stretched when shrinking
    center = scale * (torch.arange(out, device=start.device, dtype=torch.float32)[None, :, None] + 0.5)
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length)
    pos = torch.arange(size, device=start.device, dtype=torch.float32)[None, None, :] - start  # crop coords
    weight = torch.clamp(1.0 - torch.abs((pos - center + 0.5) / support), min=0.0)
    weight = torch.where((pos >= lo) & (pos < hi), weight, torch.zeros_like(weight))
    return weight / weight.sum(-1, keepdim=True)


def render_views(images: torch.Tensor, views: torch.Tensor, out: int, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) images + (B, 5) views -> normalized float (B, 3, out, out), channels_last."""
    batch, size = images.shape[0], images.shape[1]
    views = views.to(images.device)
    cols = resample_matrix(views[:, 0], views[:, 2], out, size)
    cols = torch.where(views[:, 4, None, None].bool(), cols.flip(1), cols)
    rows = resample_matrix(views[:, 1], views[:, 3], out, size)
    x = images.float().transpose(1, 2).reshape(batch, size, size * 3)  # (B, W, H*3): contract over W first
    x = torch.bmm(cols, x).view(batch, out, size, 3).transpose(1, 2).reshape(batch, size, out * 3)
    x = torch.bmm(rows, x).view(batch, out, out, 3)  # (B, H, W, C)
    x = (x - mean * 255.0) / (std * 255.0)
    return x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalized float (B, 3, H, W), channels_last: the eval path (val packs already hold
    the eval crop)."""
    return ((images.float() - mean * 255.0) / (std * 255.0)).permute(0, 3, 1, 2)


class DeviceAugment:
    """Train and eval batch transforms for packed images, on the device the batch arrives on."""

    def __init__(self, image_size: int, pack_size: int, mean, std, seed: int, channels_last: bool = True):
        self.image_size, self.pack_size, self.seed, self.channels_last = image_size, pack_size, seed, channels_last
        self._mean, self._std = torch.tensor(mean), torch.tensor(std)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mean.device != device:
            self._mean, self._std = self._mean.to(device), self._std.to(device)
        return self._mean, self._std

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.channels_last else x.contiguous()

    def views(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        return sample_views(indices, stream_key(self.seed, epoch), self.pack_size)

    def render(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self._layout(render_views(images, views, self.image_size, *self._stats(images.device)))

    def train_batch(self, images: torch.Tensor, indices: torch.Tensor, epoch: int):
        """The Trainer's batch_transform: (augmented images, no teacher logits)."""
        return self.render(images, self.views(indices, epoch)), None

    def eval_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self._layout(normalize(images, *self._stats(images.device)))
