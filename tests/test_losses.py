"""Golden-value tests of mlfd.losses on tensors small enough to check by hand."""

from __future__ import annotations

import pytest
import torch

from mlfd.losses import ce_loss, feature_mse, kd_loss, mlfd_loss, topk_correct

# Student and teacher logits, 2 samples x 3 classes. Row 2 of the teacher equals the student's (KL 0 there).
S = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
Y = torch.tensor([2, 0])

# The golden values below were worked out by hand from the definitions (the steps are in the comments), to 7
# decimals; the implementation must agree to 1e-6.
# CE row 1: -log(e^3 / (e^1 + e^2 + e^3)) = log(1 + e^-1 + e^-2) = log(1.5032147) = 0.4076059
# CE row 2: -log(1/3) = log 3 = 1.0986123;  mean = (0.4076059 + 1.0986123) / 2 = 0.7531091
CE = 0.7531091
# KD, T = 2. Row 1: t/T = [1.5, 1, 0.5] and s/T = [0.5, 1, 1.5] share the normaliser Z = e^1.5 + e^1 + e^0.5 =
# 4.4816891 + 2.7182818 + 1.6487213 = 8.8486922, so KL = sum p_t * (t/T - s/T) = p_t[0] - p_t[2]
# = (4.4816891 - 1.6487213) / 8.8486922 = 2.8329678 / 8.8486922 = 0.3201567. Row 2: 0.
# batchmean: 0.3201567 / 2 = 0.16007835; times T^2 = 4: 0.6403133.
KD = 0.6403133
# MSE of [[1, 2], [3, 4]] vs [[1, 0], [3, 1]]: squared errors 0, 4, 0, 9 -> 13 / 4.
A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
MSE = 3.25


def test_ce() -> None:
    assert ce_loss(S, Y).item() == pytest.approx(CE, abs=1e-6)
    # Label smoothing 0.3 over 3 classes: target mass 0.8 on the label, 0.1 on each other class.
    # Row 1 log-probs: [-2.4076059, -1.4076059, -0.4076059] -> 0.2407606 + 0.1407606 + 0.3260847 = 0.7076059;
    # row 2: -log 3 = 1.0986123 whatever the target. Mean: (0.7076059 + 1.0986123) / 2 = 0.9031091.
    assert ce_loss(S, Y, label_smoothing=0.3).item() == pytest.approx(0.9031091, abs=1e-6)


def test_kd() -> None:
    assert kd_loss(S, T, temperature=2.0).item() == pytest.approx(KD, abs=1e-6)
    assert kd_loss(S, S, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(T, T, temperature=5.0).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ"):
        kd_loss(S, T[:, :2], temperature=2.0)


def test_feature_mse() -> None:
    assert feature_mse(A, B).item() == pytest.approx(MSE)
    with pytest.raises(ValueError, match="differ"):
        feature_mse(A, B[:1])


def test_mlfd_loss_weighted_total_and_named_terms() -> None:
    s = S.clone().requires_grad_(True)
    s_feats = {1: A.clone().requires_grad_(True), 2: torch.zeros(1, 2, 1, 1, requires_grad=True)}
    t_feats = {1: B, 2: torch.ones(1, 2, 1, 1)}  # MSE_2 = 1
    out = mlfd_loss(s, Y, T, s_feats, t_feats, w_ce=0.2, alpha=0.6, temperature=2.0, betas={1: 0.5, 2: 0.25})
    assert set(out) == {"loss", "ce", "kd", "mse_l1", "mse_l2"}
    assert out["ce"].item() == pytest.approx(CE, abs=1e-6)
    assert out["kd"].item() == pytest.approx(KD, abs=1e-6)
    assert out["mse_l1"].item() == pytest.approx(MSE)
    assert out["mse_l2"].item() == pytest.approx(1.0)
    total = 0.2 * CE + 0.6 * KD + 0.5 * MSE + 0.25 * 1.0
    assert out["loss"].item() == pytest.approx(total, abs=1e-6)
    out["loss"].backward()
    assert s.grad is not None and all(f.grad is not None for f in s_feats.values())


def test_mlfd_loss_zero_weights_report_without_grad() -> None:
    s = S.clone().requires_grad_(True)
    feat = A.clone().requires_grad_(True)
    out = mlfd_loss(s, Y, None, {1: feat}, {1: B}, w_ce=1.0, alpha=0.0, temperature=2.0, betas={1: 0.0})
    assert "kd" not in out  # no teacher logits: nothing to report
    assert out["mse_l1"].item() == pytest.approx(MSE) and not out["mse_l1"].requires_grad
    assert out["loss"].item() == pytest.approx(CE, abs=1e-6)
    out["loss"].backward()
    assert feat.grad is None  # beta 0: no backward through the feature path
    out = mlfd_loss(S, Y, T, {}, {}, w_ce=0.0, alpha=0.0, temperature=2.0, betas={})
    assert out["ce"].item() == pytest.approx(CE, abs=1e-6) and out["kd"].item() == pytest.approx(KD, abs=1e-6)
    assert out["loss"].item() == 0.0


def test_mlfd_loss_teacher_is_a_target_and_errors() -> None:
    t = T.clone().requires_grad_(True)
    out = mlfd_loss(S.clone().requires_grad_(True), Y, t, {}, {}, w_ce=1.0, alpha=1.0, temperature=2.0, betas={})
    out["loss"].backward()
    assert t.grad is None  # teacher logits are detached
    with pytest.raises(ValueError, match="alpha"):
        mlfd_loss(S, Y, None, {}, {}, w_ce=1.0, alpha=0.5, temperature=2.0, betas={})
    with pytest.raises(ValueError, match="no beta for level 2"):
        mlfd_loss(S, Y, T, {2: A}, {2: B}, w_ce=1.0, alpha=0.5, temperature=2.0, betas={1: 1.0})
    with pytest.raises(ValueError, match="no student features for level 1"):
        mlfd_loss(S, Y, T, {}, {1: B}, w_ce=1.0, alpha=0.5, temperature=2.0, betas={1: 1.0})


def test_mlfd_loss_bf16_inputs_computed_in_float32() -> None:
    out = mlfd_loss(S.bfloat16(), Y, T.bfloat16(), {1: A.bfloat16()}, {1: B.bfloat16()}, w_ce=1.0, alpha=1.0,
                    temperature=2.0, betas={1: 1.0})
    assert all(v.dtype == torch.float32 for v in out.values())
    assert out["kd"].item() == pytest.approx(KD, abs=1e-5)


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4],   # ranking 1, 2, 0
                           [0.9, 0.05, 0.05],  # ranking 0, ...
                           [0.2, 0.3, 0.5],   # ranking 2, 1, 0
                           [0.6, 0.3, 0.1]])  # ranking 0, 1, 2
    target = torch.tensor([2, 0, 0, 1])
    # top-1 hits: row 2 only. top-2: rows 1 (label 2 is 2nd), 2, 4 (label 1 is 2nd). top-3 and top-5 (clipped): all.
    assert topk_correct(logits, target, ks=(1, 2, 3, 5)) == {1: 1, 2: 3, 3: 4, 5: 4}
    assert topk_correct(logits, target) == {1: 1, 5: 4}
    assert topk_correct(logits[:0], target[:0]) == {1: 0, 5: 0}
