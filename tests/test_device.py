"""Device choices of the GPU paths, checked on CPU: device resolution, autocast dtype and memory format per device and
setting, channels_last batches from the batched transform, and the recipe's torch.compile option."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlfd.config import AugmentSpec, RecipeSpec, SpecError  # noqa: E402
from mlfd.data import BatchTransform  # noqa: E402
from mlfd.engine import amp_dtype, compile_module, fit, resolve_device, use_channels_last  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without GPUs")


@no_gpu
def test_resolve_device_without_gpu():
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    with pytest.raises(SpecError, match=r"pipeline.device: 'cuda' requested but no CUDA GPU is visible; allowed here: "
                                        r"auto, cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resolve_device_with_gpu():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda").type == "cuda"


@pytest.mark.parametrize("device, amp, expected", [
    (CPU, "auto", None), (CPU, "bf16", None), (CPU, "fp16", None), (CPU, "off", None),  # CPU stays exact fp32
    (CUDA, "auto", torch.bfloat16), (CUDA, "bf16", torch.bfloat16), (CUDA, "fp16", torch.float16), (CUDA, "off", None),
])
def test_amp_dtype(device, amp, expected):
    assert amp_dtype(device, amp) is expected


@pytest.mark.parametrize("device, setting, expected", [
    (CPU, "auto", False), (CPU, "on", True), (CPU, "off", False),
    (CUDA, "auto", True), (CUDA, "on", True), (CUDA, "off", False),
])
def test_use_channels_last(device, setting, expected):
    assert use_channels_last(device, setting) is expected


@pytest.mark.parametrize("train", [False, True])
def test_batch_transform_channels_last_layout(train):
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    kw = dict(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=AugmentSpec(crop_padding=2))
    cl = BatchTransform(channels_last=True, **kw)(images, train=train, generator=torch.Generator().manual_seed(0))
    plain = BatchTransform(channels_last=False, **kw)(images, train=train, generator=torch.Generator().manual_seed(0))
    assert cl.shape == plain.shape == (4, 3, 32, 32) and cl.dtype == torch.float32
    assert cl.is_contiguous(memory_format=torch.channels_last) and cl.stride(1) == 1
    assert plain.is_contiguous()
    torch.testing.assert_close(cl, plain)  # same values, only the layout differs


def test_context_transform_follows_the_device():
    from mlfd.stages.common import use_channels_last as ucl

    assert ucl is use_channels_last  # the stages take the layout from the engine's rule


class _TinyTask:
    """A few steps of a tiny conv classifier on fixed random data."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)

    def steps_per_epoch(self) -> int:
        return 4

    def train_batches(self, epoch: int):
        for i in range(4):
            yield self.x[i * 8:(i + 1) * 8], self.y[i * 8:(i + 1) * 8]

    def train_step(self, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(self.module(x), y)
        return {"loss": loss, "ce": loss}

    def evaluate(self, split: str) -> dict[str, float]:
        acc = float((self.module(self.x).argmax(1) == self.y).float().mean()) * 100
        return {"acc1": acc, "acc5": 100.0}


def test_compile_option_on_cpu():
    """recipe.compile wraps the trained module's forward with torch.compile, in place; training gives the same losses
    as eager and the state-dict keys do not change (checkpoints and resume states stay loadable)."""
    eager_task = _TinyTask()
    eager = fit(eager_task, RecipeSpec(epochs=2, compile=False), CPU, progress=False)
    task = _TinyTask()
    try:
        res = fit(task, RecipeSpec(epochs=2, compile=True), CPU, progress=False)
    except Exception as e:  # no C++ toolchain, an unsupported platform...: the option itself is not at fault
        pytest.skip(f"torch.compile is unavailable on this CPU: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    assert getattr(task.module, "_compiled_call_impl", None) is not None
    assert list(task.module.state_dict()) == list(eager_task.module.state_dict())
    assert not any(k.startswith("_orig_mod") for k in task.module.state_dict())
    for a, b in zip(res.history, eager.history):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-5)
    assert compile_module(task.module) is task.module  # idempotent


def test_compile_off_leaves_the_module_eager():
    task = _TinyTask()
    fit(task, RecipeSpec(epochs=1, compile=False), CPU, progress=False)
    assert getattr(task.module, "_compiled_call_impl", None) is None
