"""Batched image transforms in torch, on whatever device the batch lives on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


AUTOAUGMENT_VERSION = 2
"""Version of what :class:`BatchedAutoAugment` computes, for the artifact keys of stages trained with
``augment.autoaugment`` (:func:`autoaugment_key`). 1: per image before the resize, seeded through the global RNG;
2: batched, after the resize, drawn from the task's generator."""


def autoaugment_key(augment: AugmentSpec | None) -> dict[str, int]:
    """What an artifact key adds for a recipe's augmentation: ``{"autoaugment": AUTOAUGMENT_VERSION}`` when it uses
    AutoAugment (so a store written by an older mlfd is not reused for it), else nothing (keys unchanged)."""
    return {"autoaugment": AUTOAUGMENT_VERSION} if augment is not None and augment.autoaugment else {}


class BatchedAutoAugment:
    """torchvision's AutoAugment (ImageNet policy) on a whole uint8 batch, on the batch's device.

    Per image, as torchvision draws them: one of the 25 sub-policies, then for each of its two ops whether it applies
    (its probability) and, for signed ops, the sign. All draws for a batch are one ``torch.rand`` of ``[B, 5]`` from
    the generator (a CPU generator: no host-device sync). The images that drew the same op with the same magnitude
    are then transformed together by torchvision's own op (``v2.AutoAugment``'s, on the sub-batch): at most one call
    per distinct (op, magnitude) and op slot, instead of two per image.

    Args:
        interpolation: For the geometric ops (torchvision's default: nearest).
    """

    def __init__(self, interpolation: v2.InterpolationMode = v2.InterpolationMode.NEAREST):
        self._tv = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
        self._policies = self._tv._policies
        self._prob = np.array([[p for _, p, _ in policy] for policy in self._policies], dtype=np.float64)
        self._magnitudes: dict[tuple[int, int], list[list[tuple[str, float, float]]]] = {}

    def _table(self, height: int, width: int) -> list[list[tuple[str, float, float]]]:
        """Per sub-policy and op slot: (op name, magnitude, magnitude if the sign flips) at this image size."""
        if (height, width) not in self._magnitudes:
            table = []
            for policy in self._policies:
                row = []
                for name, _, bin_ in policy:
                    fn, signed = self._tv._AUGMENTATION_SPACE[name]
                    values = fn(10, height, width)
                    m = 0.0 if values is None else float(values[bin_])
                    row.append((name, m, -m if signed else m))
                table.append(row)
            self._magnitudes[(height, width)] = table
        return self._magnitudes[(height, width)]

    def draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """The batch's draws, float64 ``[n, 5]`` on the CPU: sub-policy, apply op 1, apply op 2, sign 1, sign 2."""
        if generator is None:
            return torch.rand((n, 5), dtype=torch.float64)
        return torch.rand((n, 5), generator=generator, device=generator.device, dtype=torch.float64).cpu()

    def plan(self, draws: torch.Tensor, height: int, width: int) -> list[list[tuple[str, float, np.ndarray]]]:
        """Per op slot, the groups ``(op name, magnitude, sorted image indices)`` the draws make."""
        u = draws.numpy()
        policy = np.minimum((u[:, 0] * len(self._policies)).astype(np.int64), len(self._policies) - 1)
        table = self._table(height, width)
        slots = []
        for slot in range(2):
            applies = u[:, 1 + slot] <= self._prob[policy, slot]
            flips = u[:, 3 + slot] <= 0.5
            groups: dict[tuple[str, float], list[int]] = {}
            for i in np.flatnonzero(applies):
                name, m, flipped = table[policy[i]][slot]
                groups.setdefault((name, flipped if flips[i] else m), []).append(int(i))
            slots.append([(name, m, np.asarray(idx, dtype=np.int64)) for (name, m), idx in sorted(groups.items())])
        return slots

    def apply(self, images: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
        """One op of the policy (torchvision's implementation) on a uint8 batch ``[n, C, H, W]``."""
        return self._tv._apply_image_or_video_transform(images, name, magnitude, interpolation=self._tv.interpolation,
                                                        fill=self._tv._fill)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """AutoAugment each image of uint8 ``[B, C, H, W]`` (C in {1, 3}); reproducible from ``generator``."""
        height, width = images.shape[-2:]
        out = images.clone()
        for groups in self.plan(self.draw(images.shape[0], generator), height, width):
            for name, magnitude, idx in groups:
                if name == "Identity":
                    continue
                index = to_device(torch.from_numpy(idx), images.device)
                out.index_copy_(0, index, self.apply(out.index_select(0, index), name, magnitude))
        return out


class BatchTransform:
    """uint8 ``[B, C, H, W]`` batches to normalized float32 ``[B, 3, S, S]`` model inputs, with train-time augmentation.

    Steps: bilinear resize to ``input_size`` (antialiased when shrinking); with ``augment.autoaugment`` (train only),
    the resized batch rounded to uint8 and AutoAugmented (:class:`BatchedAutoAugment`: after the resize, as the
    authors did); 1 channel repeated to 3; random crop with zero padding ``augment.crop_padding`` and random
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
        self._autoaugment = BatchedAutoAugment() if augment and augment.autoaugment else None

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
            resized = images
            if images.shape[-2:] != (self.input_size, self.input_size):
                resized = self._resize(images.float()).round_().clamp_(0, 255).to(torch.uint8)
            x = self._autoaugment(resized, generator).expand(-1, 3, -1, -1).float()
        else:
            x = self._resize(images.expand(-1, 3, -1, -1).float())
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

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``[B, C, H, W]`` bilinearly resized to ``input_size`` (antialiased when shrinking)."""
        if x.shape[-2:] == (self.input_size, self.input_size):
            return x
        shrink = x.shape[-2] > self.input_size or x.shape[-1] > self.input_size
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                             antialias=shrink)

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
