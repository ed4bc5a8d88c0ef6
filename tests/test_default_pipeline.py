"""The offline default pipeline's models: every level >= 2 is a spatial map of at least 4x4 (issue #11 item 6).

At 32 px and timm's default output stride of 32, the tiny models' level-2 maps are 1x1, so "L2 fusion" fused no
spatial map; ``output_stride: 8`` keeps the last stages at 4x4. The shapes below are the ones the README's default
table states per model.
"""

from __future__ import annotations

import pytest

from conftest import ROOT
from mlfd.config import load_pipeline, smoke_pipeline
from mlfd.models.features import LevelModel, create_model

DEFAULT = ROOT / "pipelines" / "offline_default.yaml"

# Per-sample feature shapes at each level: (F,) for level 1, (C, H, W) for the maps of levels 2..4.
SHAPES = {
    "test_resnet": {1: (96,), 2: (96, 4, 4), 3: (192, 4, 4), 4: (48, 4, 4)},
    "test_efficientnet": {1: (256,), 2: (256, 4, 4), 3: (48, 4, 4), 4: (32, 4, 4)},
    "test_convnext": {1: (64,), 2: (64, 4, 4), 3: (48, 4, 4), 4: (32, 4, 4)},
}


def _shapes(model) -> dict[int, tuple[int, ...]]:
    return LevelModel(create_model(model, num_classes=10), model.input_size).level_shapes()


@pytest.mark.parametrize("smoke", [False, True])
def test_every_model_of_the_default_pipeline_has_spatial_levels(smoke: bool) -> None:
    """Teachers, students and baselines (full and --smoke variants): exact shapes, maps of at least 4x4."""
    spec = load_pipeline(DEFAULT)
    if smoke:
        spec = smoke_pipeline(spec)
    assert [(d.name, d.model.arch) for d in spec.datasets] == [
        ("mnist", "test_resnet"), ("fashion", "test_efficientnet"), ("digits", "test_convnext")]
    models = [d.model for d in spec.datasets] + [d.student_net for d in spec.datasets]
    models += [m for m, _ in spec.baseline_groups()]
    assert len(models) == 9
    for model in models:
        assert model.input_size == 32 and model.kwargs == {"output_stride": 8}, model
        shapes = _shapes(model)
        assert shapes == SHAPES[model.arch], model.arch
        for level, shape in shapes.items():
            if level >= 2:
                assert len(shape) == 3 and min(shape[1:]) >= 4, (model.arch, level, shape)
    assert all(lvl in range(1, 5) for lvl in spec.fusion_levels) and 2 in spec.fusion_levels


def test_without_the_output_stride_the_maps_collapse() -> None:
    """The reason for ``output_stride: 8``: at timm's default stride the same models give 1x1 level-2 maps."""
    spec = load_pipeline(DEFAULT, ["datasets.mnist.model.kwargs={}", "datasets.fashion.model.kwargs={}",
                                   "datasets.digits.model.kwargs={}"])
    assert [_shapes(d.model)[2] for d in spec.datasets] == [(96, 1, 1), (256, 1, 1), (64, 1, 1)]
