"""One train/eval loop for every stage: optimizer, schedule, AMP, grad accumulation, val selection, resume state.

A stage supplies a :class:`Task` (its trainable module, its batches, a step returning named losses, and an evaluator);
:func:`fit` runs the epochs, reports metrics after each one, keeps the best state by ``val/acc1`` and can resume
from the state dict it hands out at every epoch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from mlfd.config import RecipeSpec
from mlfd.losses import topk_hits

_logger = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """A stage needed more GPU or host memory than there was (raised in place of torch's own error)."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA out-of-memory error, a failed host allocation, or Python's MemoryError."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError, OutOfMemory)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


def out_of_memory(e: BaseException, what: str) -> OutOfMemory:
    """A one-line :class:`OutOfMemory` for ``what`` (a stage or trial) from torch's error ``e``."""
    if isinstance(e, OutOfMemory):
        return e
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "host"
    return OutOfMemory(f"{what} ran out of {where} memory ({first}); lower the batch size or the model/joint width, "
                       f"or give it more memory (resources.gpu)")


_injected_oom = 0
"""Out-of-memory errors still to raise, one at the first step of each next :func:`fit` (see inject_out_of_memory)."""


def inject_out_of_memory(times: int = 1) -> None:
    """Make the first training step of each of the next ``times`` :func:`fit` calls in this process raise
    ``torch.OutOfMemoryError`` (0 disarms). A fault-injection hook: ``mlfd tune``'s trainable arms it from
    ``MLFD_FAULT_OOM`` so that its retry path runs for real on a machine whose memory is never short."""
    global _injected_oom
    if times < 0:
        raise ValueError(f"inject_out_of_memory: times must be >= 0, got {times}")
    _injected_oom = times


def _raise_injected_oom() -> None:
    global _injected_oom
    if _injected_oom > 0:
        _injected_oom -= 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate the first training batch (injected by "
                                     "mlfd.engine.inject_out_of_memory)")


def accumulation_groups(steps: int, accum: int) -> list[int]:
    """How many batches each optimizer step of an epoch of ``steps`` batches accumulates with ``grad_accum = accum``:
    ``accum`` each, the last step the remainder (``steps % accum``) when ``accum`` does not divide ``steps``."""
    if steps < 0 or accum < 1:
        raise ValueError(f"accumulation_groups: need steps >= 0 and accum >= 1, got {steps}, {accum}")
    full, rest = divmod(steps, accum)
    return [accum] * full + ([rest] if rest else [])


ACCUMULATION_VERSION = 2
"""Version of :func:`fit`'s gradient accumulation, part of the key of an artifact trained with ``grad_accum > 1``."""


def accumulation_key(recipe: RecipeSpec) -> dict[str, int]:
    """What an artifact key adds for a recipe's gradient accumulation: ``{"accumulation": 2}`` when ``grad_accum > 1``
    (since version 2 the short last group of an epoch is averaged over its own batches, see :func:`fit`), else
    nothing: ``grad_accum: 1`` trains exactly as before, with the same keys."""
    return {"accumulation": ACCUMULATION_VERSION} if recipe.grad_accum > 1 else {}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from mlfd.errors import SpecError

        raise SpecError("pipeline.device: 'cuda' requested but no CUDA GPU is visible; allowed here: auto, cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for a recipe's ``amp`` setting on a device (None = full fp32)."""
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if device.type != "cuda":
        return None  # autocast on CPU is slower than fp32 for these models; keep CPU runs exact
    return torch.bfloat16 if amp == "bf16" else torch.float16


def use_channels_last(device: torch.device, setting: str) -> bool:
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def compile_module(module: nn.Module) -> nn.Module:
    """Compile ``module``'s forward in place with ``torch.compile`` (``RecipeSpec.compile``); idempotent.

    ``nn.Module.compile`` keeps the module object, its attributes and its state-dict keys (no ``_orig_mod.``
    prefix), so the task's own references to the module, checkpoints and resume states stay as they are. Submodules
    called directly (a student's ``backbone`` in evaluation) run eagerly.
    """
    if getattr(module, "_compiled_call_impl", None) is None:
        module.compile()
    return module


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


ONECYCLE_RAMP = 0.3
"""Fraction of the steps a one-cycle schedule spends rising to the peak lr when the recipe sets no warmup."""
ONECYCLE_DIV = 25.0
"""A one-cycle schedule starts at lr / ONECYCLE_DIV ..."""
ONECYCLE_FINAL_DIV = 1e4
"""... and ends at lr / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV) (torch's OneCycleLR defaults)."""


def build_optimizer(module: nn.Module | Iterable[nn.Parameter], recipe: RecipeSpec) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, built by ``timm.optim.create_optimizer_v2``.

    adamw: decoupled decay; adam: coupled L2 decay (the authors' T1 recipe); sgd: momentum 0.9, nesterov. Given a
    module, biases and norm parameters (every parameter of one dimension) and the names its ``no_weight_decay()``
    returns get no weight decay (timm's ``param_groups_weight_decay``); frozen parameters are left out.
    """
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    if isinstance(module, nn.Module):
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        params: list = param_groups_weight_decay(module, recipe.weight_decay, no_weight_decay_list=skip)
    else:
        params = [p for p in module if p.requires_grad]
    return create_optimizer_v2(params, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               momentum=0.9, filter_bias_and_bn=False)


class LrSchedule:
    """The recipe's learning-rate schedule over ``total`` optimizer steps, set before each step by :meth:`update`.

    cosine: linear warmup over ``warmup_epochs`` from lr / warmup steps, then cosine to 0 (timm
    ``CosineLRScheduler``). constant: the same warmup, then the peak lr (timm ``StepLRScheduler`` without decay).
    onecycle: torch ``OneCycleLR``: lr rises from lr / 25 to the peak over ``warmup_epochs`` (30% of the steps without
    warmup), then falls by cosine to lr / 2.5e5, while the momentum (SGD) or beta1 (Adam) cycles 0.95 -> 0.85 -> 0.95.
    """

    def __init__(self, opt: torch.optim.Optimizer, recipe: RecipeSpec, total: int, steps_per_epoch: int):
        from timm.scheduler import CosineLRScheduler, StepLRScheduler

        warm = min(int(recipe.warmup_epochs * steps_per_epoch), total - 1)
        self.kind = recipe.schedule
        timm_warmup = {"warmup_t": warm, "warmup_lr_init": recipe.lr / max(warm, 1), "warmup_prefix": True,
                       "t_in_epochs": False}
        if self.kind == "cosine":
            self.sched: Any = CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=0.0, **timm_warmup)
        elif self.kind == "constant":
            self.sched = StepLRScheduler(opt, decay_t=total + 1, decay_rate=1.0, **timm_warmup)
        else:
            ramp = warm / total if warm > 0 else ONECYCLE_RAMP
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=recipe.lr, total_steps=max(2, total), pct_start=ramp, anneal_strategy="cos",
                cycle_momentum=True, div_factor=ONECYCLE_DIV, final_div_factor=ONECYCLE_FINAL_DIV)

    def update(self, step: int) -> None:
        """Set the lr (and, for onecycle, the momentum) of optimizer step ``step`` (0-based)."""
        if self.kind == "onecycle":
            while self.sched.last_epoch < step:
                self.sched.step()
        else:
            self.sched.step_update(step)

    def state_dict(self) -> dict:
        return self.sched.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sched.load_state_dict(state)


def lr_values(recipe: RecipeSpec, total: int, steps_per_epoch: int) -> list[float]:
    """The lr of each of ``total`` optimizer steps under ``recipe`` (on a throwaway optimizer): for plots and tests."""
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], recipe)
    sched = LrSchedule(opt, recipe, total, steps_per_epoch)
    out = []
    with warnings.catch_warnings():  # no optimizer step here: torch's "scheduler stepped before optimizer" is moot
        warnings.simplefilter("ignore", UserWarning)
        for step in range(total):
            sched.update(step)
            out.append(opt.param_groups[0]["lr"])
    return out


class Task(Protocol):
    """What a stage gives the loop."""

    module: nn.Module
    """Everything trainable (frozen parts are not in it, or have requires_grad False)."""

    def train_batches(self, epoch: int) -> Iterator[Any]: ...

    def steps_per_epoch(self) -> int: ...

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward one batch; return named losses with the total under ``loss``."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on a split: at least ``acc1`` and ``acc5`` (percent)."""


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0


SYNC_EVERY = 32
"""Steps between host syncs of the train loop on an accelerator (on a CPU there is nothing to wait for: every step)."""


def sync_every(device: torch.device, setting: int | None = None) -> int:
    """How often :func:`fit` reads the loss back to the host: ``setting`` if given, else every step on a CPU and every
    :data:`SYNC_EVERY` steps on an accelerator, so that the host queues the next steps while the device runs."""
    if setting is not None:
        if setting < 1:
            raise ValueError(f"sync_every must be >= 1, got {setting}")
        return setting
    return 1 if device.type == "cpu" else SYNC_EVERY


class _StepStats:
    """One epoch's loss sums and its first non-finite loss, accumulated on the loss's device.

    Each step adds a few tiny device ops and no host sync; :meth:`check` (one sync) raises :class:`DivergedError`
    naming the first step whose loss was NaN or infinite, whenever it is called. Sums are float64, added in step
    order: the same numbers as summing ``float(loss)`` on the host.
    """

    def __init__(self) -> None:
        self.keys: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.bad_step: torch.Tensor | None = None
        self.bad_value: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.n = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        loss = losses["loss"].detach()
        if self.keys is None:
            self.keys = list(losses)
            self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=loss.device)
            self.bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.bad_value = torch.zeros((), dtype=torch.float32, device=loss.device)
        elif list(losses) != self.keys:
            raise RuntimeError(f"train_step returned losses {list(losses)} after {self.keys}; keep the same names")
        self.sums += torch.stack([losses[k].detach().to(torch.float64) for k in self.keys])
        first = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, self.n, self.bad_step)
        self.bad_value = torch.where(first, loss.float(), self.bad_value)
        self.last = loss
        self.n += 1

    def check(self, desc: str, epoch: int) -> None:
        """Raise if a loss of this epoch so far was not finite (``epoch`` counted from 1 in the message)."""
        if self.bad_step is not None:
            step = int(self.bad_step)
            if step >= 0:
                raise DivergedError(f"{desc}: loss became {float(self.bad_value)} at epoch {epoch}, step {step + 1}")

    def means(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        return {k: v / self.n for k, v in zip(self.keys, self.sums.tolist())}


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class _Progress:
    """A tqdm bar on a terminal; otherwise (Ray workers, CI logs) one line per epoch, logged."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        self.desc = desc
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def epoch_line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"{self.desc}: {text}")
        elif self.enabled:
            _logger.info("%s: %s", self.desc, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(
    task: Task,
    recipe: RecipeSpec,
    device: torch.device,
    *,
    on_epoch: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    desc: str = "train",
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    sync: int | None = None,
) -> FitResult:
    """Train ``task`` for ``recipe.epochs``, evaluating on val after every epoch; keep the best state by val/acc1.

    Args:
        on_epoch: called after each epoch with (epoch, metrics, get_state); ``get_state()`` returns a resumable
            state dict (pass it back as ``resume``). Raising inside it stops training (e.g. Ray Tune's stop).
        resume: a state from ``get_state`` to continue from.
        should_stop: polled between epochs.
        sync: read the loss back to the host every this many steps (default :func:`sync_every`): a NaN or infinite
            loss raises :class:`DivergedError` naming its step at the next read, and the epoch's end always reads.

    Gradient accumulation (``recipe.grad_accum = a``): each batch the task yields is a micro-batch; the loss of each
    is divided by the number of micro-batches of its optimizer step (``a``, or the remainder for an epoch's short last
    group: :func:`accumulation_groups`), their gradients add up, and the optimizer and the lr schedule step once per
    group, so a step over ``a`` equal micro-batches of ``B/a`` samples has the gradient of one batch of ``B`` (to
    float rounding; test_memory.py). Layers that look at the batch see the micro-batches: BatchNorm normalizes each
    micro-batch with its own statistics and updates its running statistics once per micro-batch, so a network with
    BatchNorm (or any batch-dependent layer) trains close to, not exactly like, the full batch. ``a = 1`` divides each
    loss by 1: the same numbers as without accumulation. The epoch's ``train/loss`` is the mean over micro-batches.

    At return the module holds the best epoch's weights.
    """
    module = task.module
    if recipe.compile:
        compile_module(module)
    opt = build_optimizer(module, recipe)
    steps = task.steps_per_epoch()
    groups = accumulation_groups(steps, recipe.grad_accum)
    total = max(1, recipe.epochs * len(groups))
    sched = LrSchedule(opt, recipe, total, len(groups))
    dtype = amp_dtype(device, recipe.amp)
    every = sync_every(device, sync)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    history: list[dict[str, float]] = []
    best_state, best_metrics, best_epoch, start_epoch, opt_step = None, {}, -1, 0, 0
    if resume is not None:
        module.load_state_dict(resume["module"])
        opt.load_state_dict(resume["optimizer"])
        if "scheduler" in resume:  # a state saved before schedules had state: update() recomputes them from the step
            sched.load_state_dict(resume["scheduler"])
        history = list(resume["history"])
        best_state, best_metrics, best_epoch = resume["best_state"], resume["best_metrics"], resume["best_epoch"]
        start_epoch, opt_step = resume["epoch"] + 1, resume["opt_step"]
        torch.set_rng_state(resume["rng"])

    bar = _Progress(steps * (recipe.epochs - start_epoch), desc, progress)
    try:
        for epoch in range(start_epoch, recipe.epochs):
            module.train()
            stats = _StepStats()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for i, batch in enumerate(task.train_batches(epoch)):
                if i == 0:
                    _raise_injected_oom()
                with autocast(device, dtype):
                    losses = task.train_step(batch)
                loss = losses["loss"]
                stats.add(losses)
                if (i + 1) % every == 0:
                    stats.check(desc, epoch + 1)
                    bar.update(every, {"loss": f"{float(stats.last):.3f}"})
                group = i // recipe.grad_accum
                scaled = loss / (groups[group] if group < len(groups) else recipe.grad_accum)
                (scaler.scale(scaled) if scaler else scaled).backward()
                if (i + 1) % recipe.grad_accum == 0 or i + 1 == steps:
                    sched.update(opt_step)
                    if scaler:
                        scaler.unscale_(opt)
                    if recipe.grad_clip > 0:
                        nn.utils.clip_grad_norm_(module.parameters(), recipe.grad_clip)
                    if scaler:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    opt_step += 1
            stats.check(desc, epoch + 1)
            bar.update(stats.n % every)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the epoch's time includes its last queued kernels
            train_time = time.perf_counter() - t0
            metrics: dict[str, float] = {"epoch": epoch + 1}
            for k, v in stats.means().items():
                metrics["train/loss" if k == "loss" else f"train/loss/{k}"] = v
            metrics["train/time_s"] = train_time
            with torch.inference_mode(), autocast(device, dtype):
                module.eval()
                for k, v in task.evaluate("val").items():
                    metrics[f"val/{k}"] = v
            metrics["lr"] = opt.param_groups[0]["lr"]
            history.append(metrics)
            if metrics["val/acc1"] > best_metrics.get("val/acc1", -1.0):
                best_state, best_metrics, best_epoch = _cpu_state(module), dict(metrics), epoch
            bar.epoch_line(f"epoch {epoch + 1}/{recipe.epochs} loss {metrics['train/loss']:.4f} "
                           f"val/acc1 {metrics['val/acc1']:.2f} (best {best_metrics['val/acc1']:.2f} @ {best_epoch + 1})")

            def get_state(epoch: int = epoch) -> dict:
                return {"module": _cpu_state(module), "optimizer": copy.deepcopy(opt.state_dict()),
                        "scheduler": copy.deepcopy(sched.state_dict()), "history": history, "best_state": best_state,
                        "best_metrics": best_metrics, "best_epoch": best_epoch, "epoch": epoch, "opt_step": opt_step,
                        "rng": torch.get_rng_state()}

            if on_epoch is not None:
                on_epoch(epoch, metrics, get_state)
            if should_stop is not None and should_stop():
                break
    finally:
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch + 1, best_metrics=best_metrics, history=history, epochs_run=len(history))


@torch.inference_mode()
def evaluate_logits(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean CE over (logits, target) pairs.

    Counts and the CE sum stay on the logits' device until the end (one host sync, not one per batch).
    """
    n, hits, loss = 0, None, None
    for logits, y in batches:
        logits = logits.float()
        h = topk_hits(logits, y, ks=(1, 5))
        ce = nn.functional.cross_entropy(logits, y, reduction="sum").to(torch.float64)
        hits, loss = (h, ce) if hits is None else (hits + h, loss + ce)
        n += y.numel()
    if hits is None:
        return {"acc1": 0.0, "acc5": 0.0, "loss": 0.0}
    (c1, c5), total = hits.tolist(), float(loss)
    n = max(n, 1)
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": total / n}
