"""Tests of mlfd.models: multi-level features of real (tiny, random-init) timm models, T*, and students."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mlfd.config import ModelSpec, SpecError
from mlfd.models import JointTeacher, LevelModel, SpatialResize, Student, check_arch, create_model

# Small Swin (one block per stage, 16 channels) with a window that fits a 64 px input: 16x16 -> 8x8 -> 4x4 -> 2x2.
SWIN_KWARGS = dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def make(arch: str, size: int, num_classes: int = 5, method: str = "auto", **kwargs) -> LevelModel:
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch=arch, input_size=size, kwargs=kwargs), num_classes)
    return LevelModel(model, size, method=method).eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


class NoIntermediates(nn.Module):
    """A timm-style classifier without ``forward_intermediates``: only feature_info names, so LevelModel must hook.

    Every family of the installed timm (1.0.31) has ``forward_intermediates``; this stands for a third-party or
    older-timm family. It exposes only the last two stages of a timm ResNet, so it offers levels 1..3.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inner = timm.create_model("test_resnet", num_classes=4)
        self.feature_info = [dict(f, module=f"inner.{f['module']}") for f in self.inner.feature_info[-2:]]
        self.pretrained_cfg = {"architecture": "no_intermediates_resnet"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.inner.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------------------------
# LevelModel
# ------------------------------------------------------------------------------------------------------------------

CASES = {
    # arch, input size, kwargs, exact level shapes
    "test_resnet": ("test_resnet", 32, {}, {1: (96,), 2: (96, 1, 1), 3: (192, 2, 2), 4: (48, 4, 4)}),
    "resnet18": ("resnet18", 32, {}, {1: (512,), 2: (512, 1, 1), 3: (256, 2, 2), 4: (128, 4, 4)}),
    # ViT: token maps (1 class token + 4x4 patches) must come out as NCHW maps; levels 2..4 are the last 3 blocks.
    "test_vit": ("test_vit", 64, {"img_size": 64}, {1: (64,), 2: (64, 4, 4), 3: (64, 4, 4), 4: (64, 4, 4)}),
    # Swin: NHWC stage outputs and final features must come out as NCHW maps.
    "swin": ("swin_tiny_patch4_window7_224", 64, SWIN_KWARGS,
             {1: (128,), 2: (128, 2, 2), 3: (64, 4, 4), 4: (32, 8, 8)}),
    # EfficientNet: level 2 is the head-conv map the head pools (256 ch), as in the authors' code (1280 for B0).
    "test_efficientnet": ("test_efficientnet", 32, {}, {1: (256,), 2: (256, 1, 1), 3: (48, 2, 2), 4: (32, 4, 4)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_level_shapes_and_forward(case: str) -> None:
    arch, size, kwargs, expected = CASES[case]
    lm = make(arch, size, **kwargs)
    assert lm.method == "intermediates"
    assert lm.num_levels == 4
    assert lm.level_shapes() == expected
    assert lm.level_shapes([3, 1]) == {3: expected[3], 1: expected[1]}
    x = images(size)
    with torch.no_grad():
        ref = lm.model(x)
        logits, feats = lm(x, levels=(1, 2, 3, 4))
        plain, none = lm(x)
    assert none == {}
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for lvl, shape in expected.items():
        assert tuple(feats[lvl].shape) == (2, *shape)
        with torch.no_grad():
            torch.testing.assert_close(lm.forward_level(x, lvl), feats[lvl], rtol=1e-5, atol=1e-5)
    # Level 1 is the classifier's input: applying the classifier to it gives the logits.
    torch.testing.assert_close(lm.model.get_classifier()(feats[1]), ref, rtol=1e-5, atol=1e-5)


class _Counting:
    """Counts the calls of a model's ``forward_head`` (wraps the bound method on the instance)."""

    def __init__(self, model: nn.Module):
        self.calls, self._inner = 0, model.forward_head
        model.forward_head = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._inner(*args, **kwargs)


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_head_dropout_one_mask_for_level1_and_logits(arch: str) -> None:
    lm = make(arch, 32, drop_rate=0.5)
    x = images(32, batch=4)
    final = lm.model.forward_features(x)
    # Eval: bit-identical to the two separate head calls the level-1 features and the logits used to come from.
    with torch.no_grad():
        ref_pre, ref_logits = lm.model.forward_head(final, pre_logits=True), lm.model.forward_head(final)
        counter = _Counting(lm.model)
        logits, feats = lm(x, levels=(1, 2))
    assert counter.calls == 1
    assert torch.equal(feats[1], ref_pre) and torch.equal(logits, ref_logits)
    # Train, drop_rate 0.5: one head call; level 1 is the dropped-out vector the classifier saw.
    lm.train()
    with torch.no_grad():
        counter.calls = 0
        torch.manual_seed(3)
        logits, feats = lm(x, levels=(1, 2))
        assert counter.calls == 1
        torch.testing.assert_close(lm.model.get_classifier()(feats[1]), logits, rtol=0, atol=0)
        lm.model.drop_rate = 0.0  # the same train-mode forward without the head's dropout: the pooled features
        if hasattr(lm.model, "head") and hasattr(lm.model.head, "drop"):
            lm.model.head.drop.p = 0.0
        _, clean = lm(x, levels=(1,))
    live = clean[1] != 0  # (pooled ReLU features are often 0 already)
    dropped = live & (feats[1] == 0)
    assert live.sum() >= 40 and 0.3 < dropped.sum() / live.sum() < 0.7  # about half the entries were dropped ...
    kept = live & ~dropped
    torch.testing.assert_close(feats[1][kept], 2 * clean[1][kept])  # ... and the rest scaled by 1 / (1 - p)


@pytest.mark.parametrize("case", ["test_resnet", "test_vit", "swin"])
def test_hook_fallback_matches_forward_intermediates(case: str) -> None:
    arch, size, kwargs, expected = CASES[case]
    fi = make(arch, size, **kwargs)
    hooks = LevelModel(fi.model, size, method="hooks")
    assert hooks.level_shapes() == expected
    x = images(size)
    with torch.no_grad():
        a_logits, a = fi(x, levels=(1, 2, 3, 4))
        b_logits, b = hooks(x, levels=(1, 2, 3, 4))
    torch.testing.assert_close(b_logits, a_logits)
    for lvl in expected:
        torch.testing.assert_close(b[lvl], a[lvl])


def test_family_without_forward_intermediates_uses_hooks() -> None:
    torch.manual_seed(0)
    model = NoIntermediates().eval()
    assert not hasattr(type(model), "forward_intermediates")
    lm = LevelModel(model, 32)
    assert lm.method == "hooks"
    assert lm.num_levels == 3  # 1 + two stages
    assert lm.level_shapes() == {1: (96,), 2: (96, 1, 1), 3: (192, 2, 2)}
    x = images(32)
    with torch.no_grad():
        logits, feats = lm(x, levels=(1, 2, 3))
        ref_final, ref_inter = model.inner.forward_intermediates(x, indices=2)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(feats[3], ref_inter[0])
    torch.testing.assert_close(feats[2], ref_final)
    msg = r"^student\.levels: model 'no_intermediates_resnet' has levels 1\.\.3 at input size 32; got 4$"
    with pytest.raises(SpecError, match=msg):
        lm.check_levels([4], "student.levels")


def test_level_beyond_model_is_spec_error() -> None:
    lm = make("test_resnet", 32)
    with pytest.raises(SpecError) as err:
        lm.check_levels([2, 5], "pipeline.fusion_levels")
    msg = str(err.value)
    assert msg == "pipeline.fusion_levels: model 'test_resnet' has levels 1..4 at input size 32; got 5"
    assert "\n" not in msg
    with pytest.raises(SpecError, match="got 5"):
        lm(images(32), levels=(5,))
    with pytest.raises(SpecError, match="got 0"):
        lm.forward_level(images(32), 0)


def test_unknown_arch_is_spec_error() -> None:
    path = "pipeline.datasets[0].model.arch"
    with pytest.raises(SpecError) as err:
        check_arch("resnet19", path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown timm model 'resnet19'; see timm.list_models() (close matches: ")
    assert "resnet18" in msg and "\n" not in msg
    with pytest.raises(SpecError, match=r"^model\.arch: unknown timm model 'nope_net'"):
        create_model(ModelSpec(arch="nope_net"), 3)
    check_arch("resnet18", path)  # known: no error


def test_bad_kwargs_is_spec_error() -> None:
    with pytest.raises(SpecError, match=r"^model\.kwargs: timm\.create_model\('test_resnet'\) rejected them"):
        create_model(ModelSpec(arch="test_resnet", kwargs={"no_such_option": 1}), 3)
    with pytest.raises(SpecError, match=r"^model\.kwargs\.num_classes"):
        create_model(ModelSpec(arch="test_resnet", kwargs={"num_classes": 3}), 3)


def test_level_shapes_preserve_mode_and_running_stats() -> None:
    lm = make("test_resnet", 32).train()
    lm.model.layer1.eval()  # a partly frozen model keeps its per-module modes
    bn = lm.model.bn1
    before = bn.running_mean.clone()
    lm.level_shapes()
    assert lm.training and lm.model.training and bn.training and not lm.model.layer1.training
    torch.testing.assert_close(bn.running_mean, before)


def test_model_that_cannot_run_at_input_size_is_spec_error() -> None:
    swin = make("swin_tiny_patch4_window7_224", 64, **SWIN_KWARGS).model
    lm = LevelModel(swin, 48)  # this Swin was built for 64 px only
    with pytest.raises(SpecError, match="^model 'swin_tiny_patch4_window7_224' cannot run at input size 48: "):
        lm.num_levels


def test_checkpoint_roundtrip(tmp_path) -> None:
    lm = make("test_resnet", 32, num_classes=3)
    x = images(32)
    with torch.no_grad():
        ref = lm.model(x)
    # Saved through the wrapper (keys prefixed "model.") and nested under "state_dict": both are unwrapped.
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": lm.state_dict()}, path)
    loaded = create_model(ModelSpec(arch="test_resnet", checkpoint=str(path)), 3).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)
    # Raw state dict of the bare model.
    torch.save(lm.model.state_dict(), path)
    create_model(ModelSpec(arch="test_resnet", checkpoint=str(path)), 3)
    # Wrong class count: one-line SpecError naming the field.
    with pytest.raises(SpecError, match=r"^model\.checkpoint: .* does not fit model 'test_resnet': .*shape mismatch"):
        create_model(ModelSpec(arch="test_resnet", checkpoint=str(path)), 7)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SpecError, match=r"^model\.checkpoint: cannot load .*weights_only=True"):
        create_model(ModelSpec(arch="test_resnet", checkpoint=str(bad)), 3)


# ------------------------------------------------------------------------------------------------------------------
# JointTeacher
# ------------------------------------------------------------------------------------------------------------------

JOINT_CASES = {
    # name: (fusion level, per-teacher level-k shapes, classes per head, expected embedding shapes for width 16)
    "L1_m2": (1, [(96,), (40,)], [3, 7], {1: (16,)}),
    "L1_m3": (1, [(96,), (40,), (8,)], [3, 7, 2], {1: (16,)}),
    "L2_m2": (2, [(32, 4, 4), (48, 2, 2)], [3, 7], {1: (16,), 2: (16, 2, 2)}),
    "L2_m3": (2, [(32, 4, 4), (48, 2, 2), (16, 8, 8)], [3, 7, 2], {1: (16,), 2: (16, 2, 2)}),
    "L3_m2": (3, [(32, 8, 8), (24, 6, 6)], [3, 7], {1: (16,), 2: (16, 3, 3), 3: (16, 6, 6)}),
    "L3_m3": (3, [(32, 7, 7), (24, 14, 14), (8, 9, 9)], [3, 7, 2], {1: (16,), 2: (16, 4, 4), 3: (16, 7, 7)}),
    "L3_1x1": (3, [(32, 1, 1), (24, 2, 2)], [3, 7], {1: (16,), 2: (16, 1, 1), 3: (16, 1, 1)}),
    "L4_m2": (4, [(32, 7, 7), (24, 14, 14)], [3, 7], {1: (16,), 2: (16, 2, 2), 3: (16, 4, 4), 4: (16, 7, 7)}),
}


@pytest.mark.parametrize("case", list(JOINT_CASES))
def test_joint_teacher_forward_backward(case: str) -> None:
    k, shapes, classes, expected = JOINT_CASES[case]
    torch.manual_seed(0)
    jt = JointTeacher(shapes, k, classes, adaptor_width=8, width=16, dropout=0.5).train()
    assert jt.embedding_shapes == expected
    feats = [torch.randn(4, *s) for s in shapes]
    z, emb = jt(feats)
    assert tuple(z.shape) == (4, 16)
    assert {c: tuple(e.shape[1:]) for c, e in emb.items()} == expected
    assert z is emb[1]
    logits = jt.all_logits(z)
    assert [tuple(lg.shape) for lg in logits] == [(4, n) for n in classes]
    torch.testing.assert_close(jt.logits(z, 1), logits[1])
    loss = sum(lg.logsumexp(-1).mean() for lg in logits) + sum(e.square().mean() for e in emb.values())
    loss.backward()
    for i, adaptor in enumerate(jt.adaptors):
        grads = [p.grad for p in adaptor.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches adaptor {i}"


def test_joint_teacher_single_teacher_single_head() -> None:
    jt = JointTeacher([(24, 4, 4)], 2, [5], adaptor_width=8, width=16).eval()
    z, emb = jt([torch.randn(3, 24, 4, 4)])
    assert tuple(jt.logits(z, 0).shape) == (3, 5)
    assert len(jt.all_logits(z)) == 1 and tuple(emb[2].shape) == (3, 16, 4, 4)


def test_joint_teacher_accepts_float16_cache() -> None:
    jt = JointTeacher([(8,), (6,)], 1, [2, 2], adaptor_width=4, width=8).eval()
    z, _ = jt([torch.randn(2, 8).half(), torch.randn(2, 6).half()])
    assert z.dtype == torch.float32


def test_joint_teacher_rejects_bad_input() -> None:
    with pytest.raises(SpecError, match=r"^joint\.in_shapes\[1\]: level-2 features must have shape \(C, H, W\)"):
        JointTeacher([(8, 2, 2), (8,)], 2, [2, 2])
    with pytest.raises(SpecError, match=r"^joint\.fusion_level: must be an integer in 1\.\.4, got 5"):
        JointTeacher([(8,)], 5, [2])
    jt = JointTeacher([(8,), (6,)], 1, [2, 2])
    with pytest.raises(ValueError, match="expects features of 2 teachers"):
        jt([torch.randn(2, 8)])
    with pytest.raises(ValueError, match="teacher 1"):
        jt([torch.randn(2, 8), torch.randn(2, 7)])


def test_spatial_resize() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(SpatialResize((2, 2))(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert SpatialResize((4, 4))(x) is x
    up = SpatialResize((8, 6))(x)
    assert tuple(up.shape) == (1, 1, 8, 6)


# ------------------------------------------------------------------------------------------------------------------
# Student, and the three pieces together
# ------------------------------------------------------------------------------------------------------------------


def test_student_adaptors_map_to_targets() -> None:
    backbone = make("test_resnet", 32)  # levels: 1 (96,), 2 (96, 1, 1), 3 (192, 2, 2), 4 (48, 4, 4)
    targets = {1: (16,), 2: (96, 1, 1), 3: (16, 4, 4), 4: (48, 2, 2)}
    student = Student(backbone, targets).eval()
    assert isinstance(student.adaptors["1"], nn.Linear)
    assert isinstance(student.adaptors["2"], nn.Identity)  # shapes already match: no adaptor
    # Growing 2x2 -> 4x4: the 1x1 conv runs first, on the smaller grid.
    assert [type(m) for m in student.adaptors["3"]] == [nn.Conv2d, SpatialResize]
    assert isinstance(student.adaptors["4"], SpatialResize)  # same channels, shrink only
    x = images(32, batch=3)
    with torch.no_grad():
        logits, feats = student(x)
        deployed = student.backbone.model(x)
    assert {c: tuple(f.shape[1:]) for c, f in feats.items()} == targets
    torch.testing.assert_close(logits, deployed)
    torch.testing.assert_close(student.backbone(x)[0], deployed)


def test_student_without_targets_and_bad_levels() -> None:
    student = Student(make("test_resnet", 32), {}).eval()
    x = images(32)
    logits, feats = student(x)
    assert feats == {}
    torch.testing.assert_close(logits, student.backbone.model(x))
    with pytest.raises(SpecError, match=r"^student\.target_shapes: model 'test_resnet' has levels 1\.\.4 .*got 5$"):
        Student(make("test_resnet", 32), {5: (8, 1, 1)})
    with pytest.raises(SpecError, match=r"^student\.target_shapes\.2: cannot adapt student features"):
        Student(make("test_resnet", 32), {2: (8,)})


def test_teachers_joint_teacher_and_students_end_to_end() -> None:
    """Two teachers of different families and class counts -> T* at level 3 -> students distilled at 1..3."""
    k = 3
    teachers = [make("test_resnet", 32, num_classes=3), make("test_vit", 64, num_classes=7, img_size=64)]
    shapes = [t.level_shapes([k])[k] for t in teachers]
    assert shapes == [(192, 2, 2), (64, 4, 4)]
    jt = JointTeacher(shapes, k, [3, 7], adaptor_width=8, width=16).train()
    with torch.no_grad():
        feats = [teachers[0].forward_level(images(32), k), teachers[1].forward_level(images(64), k)]
    z, emb = jt(feats)
    for i, (t, size) in enumerate(zip(teachers, (32, 64))):
        student = Student(make(t.arch, size, num_classes=jt.num_classes[i], **({"img_size": 64} if size == 64 else {})),
                          jt.embedding_shapes).train()
        logits, s_feats = student(images(size))
        loss = sum(((s_feats[c] - emb[c].detach()) ** 2).mean() for c in emb) + logits.sum() * 0
        loss.backward()
        assert all(p.grad is not None for p in student.adaptors.parameters())
