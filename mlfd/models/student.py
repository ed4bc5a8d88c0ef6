"""Students: a LevelModel plus training-only adaptors P_c onto the joint teacher's embeddings (Eq. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mlfd.errors import SpecError
from mlfd.models.features import LevelModel
from mlfd.models.joint import SpatialResize

__all__ = ["Student", "make_adaptor"]


def make_adaptor(src: Sequence[int], dst: Sequence[int], path: str = "student.target_shapes") -> nn.Module:
    """The adaptor P_c mapping features of per-sample shape ``src`` to ``dst``.

    Vectors: ``Linear(F -> F')``. Maps: 1x1 conv ``C -> C'`` and a spatial resize when (H, W) differ. Identity
    when the shapes already match (the authors' setting: T*'s last width equals the student's, no adaptor).

    Args:
        src: ``(F,)`` or ``(C, H, W)`` of the student's features.
        dst: Shape of the joint teacher's embedding at the same level (same rank as ``src``).
        path: Dotted path used in the error message.

    Raises:
        SpecError: ``src`` and ``dst`` are not both vectors or both maps.
    """
    src, dst = tuple(src), tuple(dst)
    if len(src) != len(dst) or len(src) not in (1, 3):
        raise SpecError(f"{path}: cannot adapt student features {src} to target {dst}; "
                        "allowed: (F,) -> (F',) or (C, H, W) -> (C', H', W')")
    if src == dst:
        return nn.Identity()
    if len(src) == 1:
        return nn.Linear(src[0], dst[0])
    layers: list[nn.Module] = []
    conv = nn.Conv2d(src[0], dst[0], 1) if src[0] != dst[0] else None
    resize = SpatialResize(dst[1:]) if src[1:] != dst[1:] else None
    # A 1x1 conv commutes with pooling/bilinear resizing (both linear, resize weights sum to 1), so run the conv on
    # the smaller of the two grids: resize first when shrinking, conv first when growing.
    shrinking = src[1] * src[2] > dst[1] * dst[2]
    for layer in ((resize, conv) if shrinking else (conv, resize)):
        if layer is not None:
            layers.append(layer)
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class Student(nn.Module):
    """A LevelModel plus training-only adaptors P_c mapping its level-c features to the joint teacher's e_c shape.

    Deployed student = ``.backbone`` alone (``.backbone.model`` is the bare timm model): the adaptors only serve the
    feature loss, so distillation adds no inference cost.

    Attributes:
        backbone: The student's LevelModel.
        adaptors: ``ModuleDict`` level (as str) -> P_c.
        levels: Sorted levels distilled at the feature level.
    """

    def __init__(self, backbone: LevelModel, target_shapes: Mapping[int, Sequence[int]]):
        """Build the adaptors.

        Args:
            backbone: The student LevelModel (fresh init).
            target_shapes: Level c -> per-sample shape of the joint teacher's e_c (``JointTeacher.embedding_shapes``
                restricted to the distilled levels); empty for a logits-only student.

        Raises:
            SpecError: A level the backbone does not offer, or a vector/map mismatch.
        """
        super().__init__()
        self.backbone = backbone
        self.levels: list[int] = sorted(int(c) for c in target_shapes)
        backbone.check_levels(self.levels, "student.target_shapes")
        src = backbone.level_shapes(self.levels) if self.levels else {}
        self.target_shapes = {c: tuple(int(d) for d in target_shapes[c]) for c in self.levels}
        self.adaptors = nn.ModuleDict(
            {str(c): make_adaptor(src[c], self.target_shapes[c], f"student.target_shapes.{c}") for c in self.levels})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits and adapted features.

        Args:
            x: Images ``[B, 3, H, W]``.

        Returns:
            ``(logits, {c: P_c(s_c)})`` for c in ``target_shapes``; ``(logits, {})`` when there are none.
        """
        logits, feats = self.backbone(x, levels=self.levels)
        return logits, {c: self.adaptors[str(c)](feats[c]) for c in self.levels}
