"""What a trained student costs to deploy: its parameter count and its forward latency, the cost objectives and
constraints of a multi-objective search (``student/params``, ``student/latency_ms``; see mlfd.stages.pareto).

The deployed student is the bare timm model (``Student.backbone.model``): the adaptors serve only the feature loss.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from mlfd.config import COST_METRICS, ModelSpec
from mlfd.models import create_model

STUDENT_PARAMS, STUDENT_LATENCY = COST_METRICS
"""``student/params``: parameters of the deployed student (its timm model with this dataset's classifier).
``student/latency_ms``: milliseconds of one fp32 forward pass of the deployed student (eval mode, no gradients) over
a batch of ``latency_batch_size`` images at its input size, on the trial's device: the median of
:data:`LATENCY_REPEATS` timed passes after :data:`LATENCY_WARMUP` untimed ones. On a shared device (several trials per
GPU or CPU) it includes their contention."""
LATENCY_WARMUP = 3
LATENCY_REPEATS = 10


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_ms(model: nn.Module, input_size: int, batch_size: int, device: torch.device,
               warmup: int = LATENCY_WARMUP, repeats: int = LATENCY_REPEATS) -> float:
    """Median wall milliseconds of one forward pass of ``model`` over a ``[batch_size, 3, S, S]`` batch on ``device``
    (fp32, eval mode; CUDA synchronized around each pass)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(batch_size, 3, input_size, input_size, device=device)
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    model.train(was_training)
    return float(statistics.median(times))


def student_cost(model_spec: ModelSpec, num_classes: int, device: torch.device,
                 latency_batch_size: int | None = None) -> dict[str, float]:
    """``{student/params: n}``, plus ``student/latency_ms`` when ``latency_batch_size`` is given, for a student of
    ``model_spec`` with ``num_classes`` outputs (a fresh model: the same architecture costs the same trained or not).
    """
    spec = ModelSpec(arch=model_spec.arch, input_size=model_spec.input_size, pretrained=False, checkpoint=None,
                     kwargs=dict(model_spec.kwargs))
    net = create_model(spec, num_classes, "student_model")
    out: dict[str, float] = {STUDENT_PARAMS: float(count_params(net))}
    if latency_batch_size:
        out[STUDENT_LATENCY] = latency_ms(net.to(device), spec.input_size, int(latency_batch_size), device)
    del net
    return out


__all__ = ["COST_METRICS", "LATENCY_REPEATS", "LATENCY_WARMUP", "STUDENT_LATENCY", "STUDENT_PARAMS", "count_params",
           "latency_ms", "student_cost"]
