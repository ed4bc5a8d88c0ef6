"""One train/eval loop for every stage: optimizer, schedule, AMP, grad accumulation, val selection, resume state.

A stage supplies a :class:`Task` (its trainable module, its batches, a step returning named losses, and an evaluator);
:func:`fit` runs the epochs, reports metrics after each one, keeps the best state by ``val/acc1`` and can resume
from the state dict it hands out at every epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from mlfd.config import RecipeSpec
from mlfd.losses import topk_correct


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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from mlfd.config import SpecError

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


def build_optimizer(params: Iterable[nn.Parameter], recipe: RecipeSpec) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":  # coupled L2 decay, as in the authors' T1 recipe
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)


def lr_factor(recipe: RecipeSpec, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` of ``total``."""
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if recipe.schedule == "constant":
        return 1.0
    t = (step - warm) / max(1, total - warm)
    if recipe.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    # onecycle without explicit warmup: 30% linear ramp then cosine to zero
    if warm == 0:
        if t < 0.3:
            return 0.04 + 0.96 * t / 0.3
        return 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


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


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class _Progress:
    """A tqdm bar on a terminal; silent otherwise (Ray workers, CI logs get one line per epoch instead)."""

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
            print(f"{self.desc}: {text}", file=sys.stderr, flush=True)

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
) -> FitResult:
    """Train ``task`` for ``recipe.epochs``, evaluating on val after every epoch; keep the best state by val/acc1.

    Args:
        on_epoch: called after each epoch with (epoch, metrics, get_state); ``get_state()`` returns a resumable
            state dict (pass it back as ``resume``). Raising inside it stops training (e.g. Ray Tune's stop).
        resume: a state from ``get_state`` to continue from.
        should_stop: polled between epochs.

    At return the module holds the best epoch's weights.
    """
    module = task.module
    if recipe.compile:
        compile_module(module)
    opt = build_optimizer(module.parameters(), recipe)
    steps = task.steps_per_epoch()
    total = max(1, recipe.epochs * math.ceil(steps / recipe.grad_accum))
    dtype = amp_dtype(device, recipe.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    history: list[dict[str, float]] = []
    best_state, best_metrics, best_epoch, start_epoch, opt_step = None, {}, -1, 0, 0
    if resume is not None:
        module.load_state_dict(resume["module"])
        opt.load_state_dict(resume["optimizer"])
        history = list(resume["history"])
        best_state, best_metrics, best_epoch = resume["best_state"], resume["best_metrics"], resume["best_epoch"]
        start_epoch, opt_step = resume["epoch"] + 1, resume["opt_step"]
        torch.set_rng_state(resume["rng"])

    bar = _Progress(steps * (recipe.epochs - start_epoch), desc, progress)
    try:
        for epoch in range(start_epoch, recipe.epochs):
            module.train()
            sums: dict[str, float] = {}
            n_batches = 0
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for i, batch in enumerate(task.train_batches(epoch)):
                with autocast(device, dtype):
                    losses = task.train_step(batch)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise DivergedError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}")
                scaled = loss / recipe.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                if (i + 1) % recipe.grad_accum == 0 or i + 1 == steps:
                    for g in opt.param_groups:
                        g["lr"] = recipe.lr * lr_factor(recipe, opt_step, total, math.ceil(steps / recipe.grad_accum))
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
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_batches += 1
                bar.update(1, {"loss": f"{float(loss.detach()):.3f}"})
            train_time = time.perf_counter() - t0
            metrics: dict[str, float] = {"epoch": epoch + 1}
            for k, v in sums.items():
                metrics["train/loss" if k == "loss" else f"train/loss/{k}"] = v / max(1, n_batches)
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
                        "history": history, "best_state": best_state, "best_metrics": best_metrics,
                        "best_epoch": best_epoch, "epoch": epoch, "opt_step": opt_step, "rng": torch.get_rng_state()}

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
    """Top-1/top-5 accuracy (percent) and mean CE over (logits, target) pairs."""
    n, c1, c5, loss = 0, 0, 0, 0.0
    for logits, y in batches:
        logits = logits.float()
        correct = topk_correct(logits, y, ks=(1, 5))
        c1 += correct[1]
        c5 += correct[5]
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += y.numel()
    n = max(n, 1)
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n}
