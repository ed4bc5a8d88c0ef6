"""The joint teacher T*: frozen teachers' level-k features fused by adaptors and shallow NN blocks NN^k..NN^1.

Paper Algorithm 1: T* sees the concatenated, adapted level-k features of all (frozen) teachers and is trained with
one classification head per dataset. Its per-level embeddings e_c (c = 1..k) are the feature targets of the
students (Eq. 3). With one teacher and one head it is also the "own teacher only" control and the authors'
per-target variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlfd.config import MAX_LEVEL
from mlfd.errors import SpecError

__all__ = ["JointTeacher", "SpatialResize", "pool_size"]


def pool_size(hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after the 2x2 average pooling between NN blocks (ceil mode; a side of 1 stays 1)."""
    return tuple(1 if s == 1 else -(-s // 2) for s in hw)  # type: ignore[return-value]


def _pool2x2(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    kernel = (min(2, h), min(2, w))  # a side of 1 is not pooled, so the map stops shrinking at 1x1
    return F.avg_pool2d(x, kernel, stride=kernel, ceil_mode=True)


class SpatialResize(nn.Module):
    """Resize NCHW maps to a fixed spatial size: adaptive average pooling down, bilinear interpolation up.

    Pooling (not interpolation) is used to shrink because it averages every input position instead of sampling.
    Identity when the size already matches.
    """

    def __init__(self, size: tuple[int, int]):
        """Args:
            size: Target ``(H, W)``.
        """
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resize ``x`` ``[B, C, H, W]`` to ``[B, C, *size]``."""
        h, w = x.shape[-2:]
        if (h, w) == self.size:
            return x
        if h >= self.size[0] and w >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class JointTeacher(nn.Module):
    """T*: per-teacher adaptors A_i on the frozen teachers' level-k features, channel concat, shallow NN blocks
    NN^k..NN^1, one head per dataset.

    For k == 1, ``A_i = Linear(F_i -> adaptor_width) + LayerNorm``; the concatenation feeds
    ``NN^1 = Dropout -> Linear(m * adaptor_width -> width) -> GELU`` whose output is e_1.

    For k >= 2, ``A_i = BN + 1x1 conv (C_i -> adaptor_width) + BN`` followed by a resize to the smallest (H, W)
    among the teachers; for c = k..2, ``NN^c = conv3x3 -> BN -> GELU`` gives e_c (``width`` channels), then 2x2
    average pooling feeds NN^{c-1}; after e_2 a global average pool feeds ``NN^1 = Dropout -> Linear -> GELU``.
    Heads are ``Linear(width -> K_h)`` on e_1.

    Attributes:
        fusion_level: k.
        num_teachers: m.
        embedding_shapes: Level c -> per-sample shape of e_c, for c in 1..k.
    """

    def __init__(self, in_shapes: Sequence[Sequence[int]], fusion_level: int, num_classes: Sequence[int],
                 adaptor_width: int = 64, width: int = 128, dropout: float = 0.85):
        """Build T*.

        Args:
            in_shapes: Per teacher, the per-sample shape of its level-k features: ``(F,)`` if k == 1 else
                ``(C, H, W)``.
            fusion_level: k in 1..4.
            num_classes: Classes of each head (one head per dataset; one entry for the per-target variant).
            adaptor_width: Units/channels of each adaptor A_i.
            width: Width of every NN block, i.e. of every embedding e_c.
            dropout: Dropout before the dense layer of NN^1 (the paper uses 0.8-0.9).

        Raises:
            SpecError: Inconsistent shapes, level, class counts or widths.
        """
        super().__init__()
        k = fusion_level
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_LEVEL:
            raise SpecError(f"joint.fusion_level: must be an integer in 1..{MAX_LEVEL}, got {k!r}")
        if not in_shapes:
            raise SpecError("joint.in_shapes: needs at least one teacher")
        want_dims = 1 if k == 1 else 3
        shapes = [tuple(int(d) for d in s) for s in in_shapes]
        for i, s in enumerate(shapes):
            if len(s) != want_dims or min(s) < 1:
                what = "(F,)" if k == 1 else "(C, H, W)"
                raise SpecError(f"joint.in_shapes[{i}]: level-{k} features must have shape {what}, got {s}")
        if not num_classes or any(int(n) < 1 for n in num_classes):
            raise SpecError(f"joint.num_classes: needs one class count >= 1 per head, got {list(num_classes)}")
        if adaptor_width < 1 or width < 1:
            raise SpecError(f"joint.adaptor_width/width: must be >= 1, got {adaptor_width}/{width}")
        if not 0 <= dropout < 1:
            raise SpecError(f"joint.dropout: must be in [0, 1), got {dropout}")

        self.fusion_level = k
        self.num_teachers = len(shapes)
        self.in_shapes = shapes
        self.num_classes = [int(n) for n in num_classes]
        self.width = int(width)
        concat = self.num_teachers * adaptor_width
        self.embedding_shapes: dict[int, tuple[int, ...]] = {}

        if k == 1:
            self.adaptors = nn.ModuleList(
                nn.Sequential(nn.Linear(s[0], adaptor_width), nn.LayerNorm(adaptor_width)) for s in shapes)
            self.blocks = nn.ModuleDict()
            fc_in = concat
        else:
            # The smallest map keeps every teacher's information at the coarsest common grid without inventing
            # resolution; per dimension, so teachers with different aspect ratios still meet.
            common = (min(s[1] for s in shapes), min(s[2] for s in shapes))
            self.adaptors = nn.ModuleList(
                nn.Sequential(nn.BatchNorm2d(s[0]), nn.Conv2d(s[0], adaptor_width, 1, bias=False),
                              nn.BatchNorm2d(adaptor_width), SpatialResize(common))
                for s in shapes)
            blocks = {}
            hw, ch = common, concat
            for c in range(k, 1, -1):
                blocks[str(c)] = nn.Sequential(nn.Conv2d(ch, width, 3, padding=1, bias=False),
                                               nn.BatchNorm2d(width), nn.GELU())
                self.embedding_shapes[c] = (width, hw[0], hw[1])
                hw, ch = pool_size(hw), width
            self.blocks = nn.ModuleDict(blocks)
            fc_in = width
        self.nn1 = nn.Sequential(nn.Dropout(dropout), nn.Linear(fc_in, width), nn.GELU())
        self.embedding_shapes[1] = (width,)
        self.embedding_shapes = dict(sorted(self.embedding_shapes.items()))
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in self.num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Fuse the teachers' level-k features.

        Args:
            feats: One tensor per teacher, ``[B, *in_shapes[i]]`` (any float dtype; cast to the adaptors' dtype so
                float16 feature caches can be fed directly).

        Returns:
            ``(z, {c: e_c})`` where ``z = e_1`` ``[B, width]`` feeds the heads.
        """
        if len(feats) != self.num_teachers:
            raise ValueError(f"JointTeacher expects features of {self.num_teachers} teachers, got {len(feats)}")
        adapted = []
        for i, (f, adaptor) in enumerate(zip(feats, self.adaptors)):
            if tuple(f.shape[1:]) != self.in_shapes[i]:
                raise ValueError(f"JointTeacher teacher {i}: expected features [B, {self.in_shapes[i]}], "
                                 f"got {tuple(f.shape)}")
            weight = next(adaptor.parameters())
            adapted.append(adaptor(f.to(weight.dtype) if f.is_floating_point() else f.float()))
        x = torch.cat(adapted, dim=1)
        emb: dict[int, torch.Tensor] = {}
        for c in range(self.fusion_level, 1, -1):
            x = self.blocks[str(c)](x)
            emb[c] = x
            x = _pool2x2(x) if c > 2 else x.mean(dim=(2, 3))
        z = self.nn1(x)
        emb[1] = z
        return z, dict(sorted(emb.items()))

    def logits(self, z: torch.Tensor, head: int) -> torch.Tensor:
        """Logits of head ``head`` (dataset index) from ``z = e_1``."""
        return self.heads[head](z)

    def all_logits(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head from ``z = e_1``, in dataset order."""
        return [head(z) for head in self.heads]

    def extra_repr(self) -> str:
        return f"fusion_level={self.fusion_level}, teachers={self.in_shapes}, heads={self.num_classes}"
