"""Device choices of the GPU paths, checked on CPU: device resolution, autocast dtype and memory format per device and
setting, channels_last batches from the batched transform, and the recipe's torch.compile option."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from conftest import ROOT

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


@pytest.mark.parametrize("device, setting, channels_last", [
    (CPU, "auto", False), (CPU, "on", True), (CPU, "off", False), (CUDA, "auto", True), (CUDA, "off", False),
])
def test_context_transform_follows_the_device(tmp_path, device, setting, channels_last):
    """The batches a stage's transform makes (Context.transform on real digits images) are channels_last exactly
    when the recipe's setting and the context's device say so, and hold the same values either way. The images stay
    on the CPU: only the layout rule reads the device."""
    from mlfd.config import PipelineSpec, from_dict, read_yaml
    from mlfd.stages.common import Context
    from mlfd.store import ArtifactStore

    spec = from_dict(PipelineSpec, read_yaml(ROOT / "pipelines" / "offline_default.yaml"))
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    ctx.device = device
    ds, model = ctx.data("digits"), spec.dataset("digits").model
    images = ds.train.images[:4]
    out = ctx.transform(ds, model, RecipeSpec(channels_last=setting))(images, train=False)
    assert out.shape == (4, 3, model.input_size, model.input_size) and out.device == CPU
    assert out.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert out.is_contiguous() is not channels_last  # a 3-channel 32x32 batch cannot be both
    reference = BatchTransform(model.input_size, ds.mean, ds.std, None, channels_last=False)(images, train=False)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


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


def _inductor_cxx() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) builds with (its ``cpp.cxx`` candidates, on PATH)."""
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


@pytest.mark.skipif(_inductor_cxx() is None, reason="torch.compile on a CPU needs a C++ compiler (g++) on PATH")
def test_compile_option_on_cpu():
    """recipe.compile wraps the trained module's forward with torch.compile, in place; training gives the same losses
    as eager and the state-dict keys do not change (checkpoints and resume states stay loadable)."""
    eager_task = _TinyTask()
    eager = fit(eager_task, RecipeSpec(epochs=2, compile=False), CPU, progress=False)
    task = _TinyTask()
    res = fit(task, RecipeSpec(epochs=2, compile=True), CPU, progress=False)
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


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_gpu
def test_cuda_fit_reads_the_loss_every_32_steps_and_still_names_the_nan_step():
    """On CUDA the loop reads the loss back every SYNC_EVERY steps: the epoch means equal those of reading every
    step (to float tolerance: GPU reductions), and a NaN from step 3 is still reported as step 3."""
    from tests.test_engine import _Task, _without_time

    from mlfd.engine import DivergedError

    dev = torch.device("cuda")

    def on_gpu(task):
        task.module.to(dev)
        task.x, task.y = task.x.to(dev), task.y.to(dev)
        return task

    recipe = RecipeSpec(epochs=2, lr=0.05, amp="off")
    every = fit(on_gpu(_Task()), recipe, dev, progress=False, sync=1)
    periodic = fit(on_gpu(_Task()), recipe, dev, progress=False)
    for a, b in zip(_without_time(every.history), _without_time(periodic.history), strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a)
    with pytest.raises(DivergedError, match=r"loss became nan at epoch 1, step 3$"):
        fit(on_gpu(_Task(nan_at=3)), recipe, dev, progress=False)


@needs_gpu
def test_cuda_stream_loader_pins_and_matches_memory(tmp_path):
    """A streamed folder on CUDA: batches through pinned memory and non-blocking copies equal the in-memory ones."""
    from tests.test_data import _digit_tree

    from mlfd.data import SOURCES
    from mlfd.data.loader import make_loader

    _digit_tree(tmp_path)
    dev = torch.device("cuda")
    mem = SOURCES["folder"]({"root": str(tmp_path), "mode": "L"}, "o").train
    st = SOURCES["folder"]({"root": str(tmp_path), "mode": "L", "stream": True, "workers": 2}, "o").train
    got = make_loader(st.images, st.labels, 5, True, seed=1, device=dev)
    assert got._loader is None
    pairs = list(zip(make_loader(mem.images, mem.labels, 5, True, seed=1, device=dev), got, strict=True))
    assert got._loader.pin_memory
    for (i, x, y), (j, u, v) in pairs:
        assert u.device.type == "cuda" and torch.equal(i, j) and torch.equal(x, u) and torch.equal(y, v)


@needs_gpu
def test_cuda_evaluations_keep_one_copy_of_the_split_on_the_gpu():
    """Every evaluation of a task reads the same CUDA copy of the split's images (copied once, not every epoch)."""
    from mlfd.data import DatasetSplits, ImageSet
    from mlfd.stages.common import EvalLoaders

    split = ImageSet(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8), torch.arange(20) % 3)
    ds = DatasetSplits(name="d", classes=["a", "b", "c"], train=split, val=split, test=split, mean=(0.5,), std=(0.2,))
    loaders = EvalLoaders(ds, torch.device("cuda"))
    val = loaders("val")
    ptr = val.images.data_ptr()
    batches = [torch.cat([x for _, x, _ in loaders("val")]) for _ in range(2)]
    assert val.images.device.type == "cuda" and loaders("val") is val and val.images.data_ptr() == ptr
    assert torch.equal(batches[0].cpu(), split.images) and torch.equal(batches[1].cpu(), split.images)


@needs_gpu
def test_cuda_training_step_inputs_never_wait_for_the_gpu():
    """What the host does for a training step never waits for the GPU's queued work (torch's sync debug mode set to
    raise): batches gathered from the device-resident split, crop/flip drawn from a CPU generator, indices sliced on
    the CPU (the joint teacher's), top-k counts. Only the epoch's permutation is copied at the epoch's start."""
    from mlfd.data import TensorLoader, to_device
    from mlfd.losses import topk_hits

    dev = torch.device("cuda")
    loader = TensorLoader(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) % 10, 8, True,
                          seed=0, device=dev)
    tf = BatchTransform(32, (0.5,) * 3, (0.25,) * 3, AugmentSpec(crop_padding=2, flip=True), channels_last=True)
    gen = torch.Generator().manual_seed(0)
    it = iter(loader)
    first = next(it)  # the epoch's permutation goes to the GPU here, once
    tf(first[1], train=True, generator=gen)  # the transform's mean/std go to the GPU once
    hits = torch.zeros(2, dtype=torch.int64, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, x, y in it:
            out = tf(x, train=True, generator=gen)
            hits += topk_hits(out.flatten(1)[:, :10], y)
            rows = to_device(torch.arange(4), dev)
            assert rows.device.type == "cuda" and idx.device.type == "cuda"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(hits[1]) >= int(hits[0]) >= 0 and out.is_contiguous(memory_format=torch.channels_last)
