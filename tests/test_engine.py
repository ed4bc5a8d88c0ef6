"""The train loop's host syncs: loss sums and the NaN check kept on the device between reads, checked on CPU against
the losses read back at every step, and evaluation's device-side counts against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mlfd.config import RecipeSpec
from mlfd.engine import SYNC_EVERY, DivergedError, build_optimizer, evaluate_logits, fit, lr_values, sync_every
from mlfd.losses import topk_correct, topk_hits

CPU = torch.device("cpu")


class _Task:
    """A 10 -> 5 MLP on 200 fixed random samples (7 steps of 32, the last one short), with two named loss terms and an
    optional NaN from the ``nan_at``-th step on (counted over the whole run). Records each step's losses on the host."""

    def __init__(self, nan_at: int | None = None, inf: bool = False):
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(200, 10, generator=g), torch.randint(0, 5, (200,), generator=g)
        self.nan_at, self.inf, self.calls = nan_at, inf, 0
        self.seen: list[dict[str, float]] = []

    def steps_per_epoch(self) -> int:
        return 7

    def train_batches(self, epoch: int):
        for s in range(0, 200, 32):
            yield self.x[s: s + 32], self.y[s: s + 32]

    def train_step(self, batch):
        self.calls += 1
        out = self.module(batch[0])
        ce = nn.functional.cross_entropy(out, batch[1])
        if self.nan_at is not None and self.calls >= self.nan_at:
            ce = ce * (float("inf") if self.inf else float("nan"))
        reg = 0.01 * out.pow(2).mean()
        losses = {"loss": ce + reg, "ce": ce, "reg": reg}
        self.seen.append({k: float(v.detach()) for k, v in losses.items()})
        return losses

    def evaluate(self, split: str) -> dict[str, float]:
        with torch.no_grad():
            return evaluate_logits((self.module(self.x[s: s + 64]), self.y[s: s + 64]) for s in range(0, 200, 64))


def _without_time(history):
    return [{k: v for k, v in h.items() if k != "train/time_s"} for h in history]


def test_sync_every_defaults_and_bad_value():
    assert sync_every(CPU) == 1
    assert sync_every(torch.device("cuda")) == SYNC_EVERY == 32  # a cuda device object needs no GPU
    assert sync_every(torch.device("cuda"), 4) == 4
    with pytest.raises(ValueError, match="sync_every must be >= 1, got 0"):
        sync_every(CPU, 0)


@pytest.mark.parametrize("sync", [2, 3, 7, 100])
def test_epoch_sums_do_not_depend_on_how_often_the_host_reads(sync):
    """Reading the loss every step or every ``sync`` steps (not dividing the 7 steps, or over them) gives the same
    history to the last bit, and each epoch's means are those of the losses read on the host at every step."""
    ref_task, task = _Task(), _Task()
    ref = fit(ref_task, RecipeSpec(epochs=3, lr=0.05), CPU, progress=False)
    res = fit(task, RecipeSpec(epochs=3, lr=0.05), CPU, progress=False, sync=sync)
    assert _without_time(res.history) == _without_time(ref.history)
    assert len(task.seen) == 21
    for epoch, h in enumerate(res.history):
        steps = task.seen[7 * epoch: 7 * (epoch + 1)]
        for key, name in (("loss", "train/loss"), ("ce", "train/loss/ce"), ("reg", "train/loss/reg")):
            assert h[name] == sum(s[key] for s in steps) / 7  # float64 sums in step order, as on the host
    assert res.history[0]["train/loss"] == pytest.approx(1.74889, abs=1e-5)  # golden (chance: ln 5 = 1.609)
    assert res.history[-1]["train/loss"] < res.history[0]["train/loss"]


@pytest.mark.parametrize("sync,nan_at,inf", [(1, 10, False), (5, 10, False), (5, 13, True), (32, 3, False)])
def test_first_non_finite_loss_is_named_by_its_step(sync, nan_at, inf):
    """A NaN (or inf) loss raises DivergedError naming the epoch and step where it first appeared, whichever read
    finds it: the next periodic one, or the end of the epoch (step 13 = epoch 2, step 6; 10 = epoch 2, step 3)."""
    task = _Task(nan_at=nan_at, inf=inf)
    epoch, step = (nan_at - 1) // 7 + 1, (nan_at - 1) % 7 + 1
    value = "inf" if inf else "nan"
    with pytest.raises(DivergedError, match=rf"^train: loss became {value} at epoch {epoch}, step {step}$"):
        fit(task, RecipeSpec(epochs=3, lr=0.05), CPU, progress=False, sync=sync)
    # The steps up to the next read ran: every `sync` steps of the epoch, and at its end (read every step: none).
    assert task.calls == 7 * (epoch - 1) + min(math.ceil(step / sync) * sync, 7)
    assert task.calls == {(1, 10): 10, (5, 10): 12, (5, 13): 14, (32, 3): 7}[sync, nan_at]


def test_loss_names_must_not_change_between_steps():
    class Changing(_Task):
        def train_step(self, batch):
            losses = super().train_step(batch)
            if self.calls == 2:
                losses["extra"] = losses.pop("reg")
            return losses

    with pytest.raises(RuntimeError, match=r"train_step returned losses \['loss', 'ce', 'extra'\] after "
                                           r"\['loss', 'ce', 'reg'\]"):
        fit(Changing(), RecipeSpec(epochs=1), CPU, progress=False)


def test_evaluate_logits_counts_on_the_device_match_a_direct_count():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(150, 10, generator=g), torch.randint(0, 10, (150,), generator=g)
    res = evaluate_logits((logits[s: s + 40], y[s: s + 40]) for s in range(0, 150, 40))
    top5 = logits.topk(5, dim=1).indices
    assert res["acc1"] == 100.0 * int((logits.argmax(1) == y).sum()) / 150
    assert res["acc5"] == 100.0 * int((top5 == y[:, None]).any(1).sum()) / 150
    assert res["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert res["acc1"] == pytest.approx(11.3333, abs=1e-3)  # golden; chance is 10%
    assert evaluate_logits([]) == {"acc1": 0.0, "acc5": 0.0, "loss": 0.0}


def test_topk_hits_stays_a_device_tensor():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    hits = topk_hits(logits, target, ks=(1, 2, 5))
    assert hits.dtype == torch.int64 and hits.shape == (3,) and hits.tolist() == [1, 2, 3]
    assert topk_correct(logits, target, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    assert topk_hits(logits[:0], target[:0], ks=(1, 5)).tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------------------------
# Optimizers and schedules (timm's optimizer factory and schedulers, torch's OneCycleLR)
# --------------------------------------------------------------------------------------------------------------------


def _cos(t: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * t))


def test_cosine_schedule_with_warmup_by_hand():
    """10 steps, warmup 1 epoch of 2 steps: lr/2, 3lr/4 (linear from lr/warmup), then cosine over the 8 steps left."""
    got = lr_values(RecipeSpec(lr=0.1, schedule="cosine", warmup_epochs=1), total=10, steps_per_epoch=2)
    want = [0.05, 0.075] + [0.1 * _cos(k / 8) for k in range(8)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    no_warm = lr_values(RecipeSpec(lr=0.1, schedule="cosine"), total=10, steps_per_epoch=2)
    assert no_warm == pytest.approx([0.1 * _cos(k / 10) for k in range(10)], rel=1e-9, abs=1e-12)


def test_constant_schedule_by_hand():
    got = lr_values(RecipeSpec(lr=0.1, schedule="constant", warmup_epochs=1), total=6, steps_per_epoch=2)
    assert got == pytest.approx([0.05, 0.075, 0.1, 0.1, 0.1, 0.1], rel=1e-9)


def test_onecycle_is_a_real_one_cycle_by_hand():
    """OneCycleLR: from lr/25 up to lr over the warmup (here 3 of 10 steps: cosine phase ends at step 2), then cosine
    down to lr/25/1e4 at the last step; momentum (beta1) moves the other way. Not the cosine schedule."""
    lr, lo, end = 0.1, 0.1 / 25, 0.1 / 25 / 1e4
    got = lr_values(RecipeSpec(lr=lr, schedule="onecycle", warmup_epochs=1.5), total=10, steps_per_epoch=2)
    up = [lo + (lr - lo) * (1 - _cos(k / 2)) for k in range(3)]  # anneal lo -> lr over steps 0..2
    down = [end + (lr - end) * _cos(k / 7) for k in range(1, 8)]  # anneal lr -> end over steps 2..9
    assert got == pytest.approx(up + down, rel=1e-9, abs=1e-12)
    cosine = lr_values(RecipeSpec(lr=lr, schedule="cosine", warmup_epochs=1.5), total=10, steps_per_epoch=2)
    assert got[0] == pytest.approx(lo) and cosine[0] == pytest.approx(lr / 3)
    no_warm = lr_values(RecipeSpec(lr=lr, schedule="onecycle"), total=10, steps_per_epoch=2)
    assert max(no_warm) == pytest.approx(lr) and no_warm.index(max(no_warm)) == 2  # 30% ramp: peak at step 0.3*10-1


def test_onecycle_cycles_momentum_and_resumes_exactly():
    """The schedule's state travels in the resume state: 1 epoch + resume for 2 more == 3 epochs straight."""
    recipe = RecipeSpec(lr=0.05, optimizer="sgd", schedule="onecycle", epochs=3, batch_size=32, warmup_epochs=1)
    straight = fit(_Task(), recipe, CPU, progress=False)
    states = []

    def keep(epoch, metrics, get_state):
        states.append(get_state())
        raise KeyboardInterrupt  # stop after the first epoch

    with pytest.raises(KeyboardInterrupt):
        fit(_Task(), recipe, CPU, progress=False, on_epoch=keep)
    assert states[0]["scheduler"]["last_epoch"] == 6  # stepped to the 7th update of epoch 1
    assert [g["momentum"] for g in states[0]["optimizer"]["param_groups"]] != [0.9, 0.9]  # cycled, not fixed
    task = _Task()
    resumed = fit(task, recipe, CPU, progress=False, resume=states[0])
    assert _without_time(resumed.history) == _without_time(straight.history)
    assert [h["lr"] for h in straight.history] != [h["lr"] for h in fit(
        _Task(), RecipeSpec(lr=0.05, optimizer="sgd", schedule="cosine", epochs=3, batch_size=32, warmup_epochs=1),
        CPU, progress=False).history]


@pytest.mark.parametrize("name, cls, decoupled", [("adamw", torch.optim.AdamW, True), ("adam", torch.optim.Adam, False),
                                                   ("sgd", torch.optim.SGD, None)])
def test_optimizer_keeps_norm_and_bias_out_of_weight_decay(name, cls, decoupled):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    module[0].weight.requires_grad_(False)  # frozen: in no group at all
    opt = build_optimizer(module, RecipeSpec(optimizer=name, lr=0.01, weight_decay=0.05))
    assert type(opt) is cls
    shapes = {g["weight_decay"]: sorted(tuple(p.shape) for p in g["params"]) for g in opt.param_groups}
    assert shapes == {0.0: [(2,), (4,), (4,), (4,)], 0.05: [(2, 4)]}  # biases + BN weight/bias; the linear weight
    if decoupled is not None:
        assert opt.defaults["decoupled_weight_decay"] is decoupled
    else:
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
