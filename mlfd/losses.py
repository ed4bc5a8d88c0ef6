"""Losses of MLFD (Eq. 3) and top-k accuracy counts.

Every term is computed in float32 (logits may come from bf16/fp16 autocast, where log-softmax and squared errors lose
precision). Teacher logits and features are targets: they are detached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ce_loss", "feature_mse", "kd_loss", "mlfd_loss", "topk_correct", "topk_hits"]


def ce_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``logits`` ``[B, K]`` against integer labels ``target`` ``[B]``."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Logit distillation ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient scale independent of T (Hinton et al., 2015).

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[B, K]`` (not detached here; :func:`mlfd_loss` detaches).
        temperature: T > 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def feature_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error over all elements; the shapes must match exactly (no silent broadcasting)."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"feature_mse: student features {tuple(student_feat.shape)} and teacher features "
                         f"{tuple(teacher_feat.shape)} differ")
    return F.mse_loss(student_feat.float(), teacher_feat.float())


def mlfd_loss(student_logits: Tensor, target: Tensor, teacher_logits: Optional[Tensor],
              student_feats: Mapping[int, Tensor], teacher_feats: Mapping[int, Tensor], *, w_ce: float,
              alpha: float, temperature: float, betas: Mapping[int, float],
              label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Eq. (3): ``L = w_ce * CE + alpha * T^2 * KL + sum_c beta_c * MSE_c`` for every level c in ``teacher_feats``.

    Terms are reported unweighted; only ``"loss"`` is weighted. A term whose weight is 0 is still reported but
    computed without autograd, so it costs no backward work.

    Args:
        student_logits: ``[B, K]``.
        target: Integer labels ``[B]``.
        teacher_logits: Joint-teacher logits ``[B, K]``, or None when ``alpha == 0`` (then ``"kd"`` is omitted).
        student_feats: Level c -> adapted student features ``P_c(s_c)``.
        teacher_feats: Level c -> joint-teacher embedding e_c (same shape); its keys choose the levels.
        w_ce: Weight of the label cross-entropy.
        alpha: Weight of the KD term.
        temperature: T.
        betas: Level c -> beta_c, for every level in ``teacher_feats``.
        label_smoothing: For the CE term.

    Returns:
        ``{"loss": total, "ce": CE, "kd": T^2 * KL, "mse_l1": ..., "mse_l2": ...}``.

    Raises:
        ValueError: ``teacher_logits`` is None with ``alpha > 0``, or a level lacks a beta or student features.
    """
    total = student_logits.float().sum() * 0.0  # keeps the graph connected even if every weight is 0
    out: dict[str, Tensor] = {}

    def term(weight: float) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if weight != 0 else torch.no_grad()

    with term(w_ce):
        out["ce"] = ce_loss(student_logits, target, label_smoothing)
    if w_ce != 0:
        total = total + w_ce * out["ce"]

    if teacher_logits is None:
        if alpha != 0:
            raise ValueError(f"mlfd_loss: teacher_logits is None but alpha = {alpha}")
    else:
        with term(alpha):
            out["kd"] = kd_loss(student_logits, teacher_logits.detach(), temperature)
        if alpha != 0:
            total = total + alpha * out["kd"]

    for c in sorted(teacher_feats):
        if c not in betas:
            raise ValueError(f"mlfd_loss: no beta for level {c}; betas has levels {sorted(betas)}")
        if c not in student_feats:
            raise ValueError(f"mlfd_loss: no student features for level {c}; got levels {sorted(student_feats)}")
        beta = float(betas[c])
        with term(beta):
            out[f"mse_l{c}"] = feature_mse(student_feats[c], teacher_feats[c].detach())
        if beta != 0:
            total = total + beta * out[f"mse_l{c}"]
    return {"loss": total, **out}


def topk_hits(logits: Tensor, target: Tensor, ks: Iterable[int] = (1, 5)) -> Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k clipped to the number of classes), as
    an int64 tensor ``[len(ks)]`` on the logits' device (no host sync)."""
    ks = list(ks)
    if not ks or len(target) == 0:
        return torch.zeros(len(ks), dtype=torch.int64, device=logits.device)
    num_classes = logits.shape[-1]
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=-1).indices  # [B, kmax], best first
    hits = top.eq(target.view(-1, 1))
    # Cumulative hit along rank: hit_at[:, j] says "label within the top j + 1".
    hit_at = hits.cumsum(dim=1) > 0
    # Columns picked by plain indexing (views): an index tensor built from a list would be a copy to the GPU per batch
    return torch.stack([hit_at[:, min(k, num_classes) - 1] for k in ks], dim=1).sum(dim=0)


def topk_correct(logits: Tensor, target: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (k clipped to the number of classes).

    Keys are the requested k, so ``acc5`` exists (and is 100%) for a 3-class problem.
    """
    ks = list(ks)
    return dict(zip(ks, topk_hits(logits, target, ks).tolist()))
