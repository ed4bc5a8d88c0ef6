"""Batched image transforms in torch, on whatever device the batch lives on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mlfd.config import AugmentSpec
from mlfd.data.loader import to_device


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) samples on ``device``, drawn from ``generator`` (on its own device) when given.

    The tasks draw from a CPU generator (the same augmentations on every device); the samples reach a GPU without
    blocking the host (:func:`mlfd.data.loader.to_device`).
    """
    if generator is None:
        return torch.rand(shape, device=device)
    return to_device(torch.rand(shape, generator=generator, device=generator.device), device)


class BatchTransform:
    """uint8 ``[B, C, H, W]`` batches to normalized float32 ``[B, 3, S, S]`` model inputs, with train-time augmentation.

    Steps: AutoAugment per image on uint8 (train, ``augment.autoaugment``); 1 channel repeated to 3; bilinear resize
    to ``input_size`` (antialiased when shrinking); random crop with zero padding ``augment.crop_padding`` and random
    horizontal flip (train, per sample, vectorised); ``(x / 255 - mean) / std``. Eval (``train=False``) is resize and
    normalize only.

    Args:
        input_size: Output side S.
        mean: Per-channel mean (3 values, [0, 1] units).
        std: Per-channel standard deviation (3 values, [0, 1] units).
        augment: Train-time augmentation; None disables it.
        channels_last: Return ``torch.channels_last`` tensors.
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], augment: AugmentSpec | None = None,
                 channels_last: bool = False):
        if input_size < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"BatchTransform: need input_size >= 1 and 3 means and 3 stds > 0, got {input_size}, "
                             f"{tuple(mean)}, {tuple(std)}")
        self.input_size = input_size
        self.augment = augment
        self.channels_last = channels_last
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET) if augment and augment.autoaugment else None

    def __call__(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one batch.

        Args:
            images: uint8 ``[B, C, H, W]`` with C in {1, 3}, on any device.
            train: Apply the train-time augmentation (if any).
            generator: Source of the augmentation's randomness (any device); None uses the global RNG.

        Returns:
            float32 ``[B, 3, input_size, input_size]`` on the images' device.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"BatchTransform: expected uint8 [B, 1|3, H, W], got {images.dtype} {list(images.shape)}")
        aug = self.augment if train else None
        if self._autoaugment is not None and aug is not None:
            images = self._auto_augment(images, generator)
        x = images.expand(-1, 3, -1, -1).float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            shrink = x.shape[-2] > self.input_size or x.shape[-1] > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        if aug is not None and aug.crop_padding > 0:
            x = self._random_crop(x, aug.crop_padding, generator)
        if aug is not None and aug.flip:
            flip = _uniform((x.shape[0],), generator, x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        mean, std = self._constants(x.device)
        x = x.div_(255.0).sub_(mean).div_(std)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._mean.to(device), self._std.to(device))
        return self._on_device[device]

    def _auto_augment(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """AutoAugment (ImageNet policy), a policy draw per image; reproducible from ``generator`` when given."""
        out = torch.empty(images.shape, dtype=images.dtype, device=images.device)
        if generator is None:
            for i in range(images.shape[0]):
                out[i] = self._autoaugment(images[i])
            return out
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):  # AutoAugment draws from the global CPU RNG
            torch.default_generator.manual_seed(seed)
            for i in range(images.shape[0]):
                out[i] = self._autoaugment(images[i])
        return out

    @staticmethod
    def _random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample random crop of the zero-padded batch back to its size (one gather, no loop over the batch)."""
        b, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = (_uniform((2, b), generator, x.device) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, chans, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
