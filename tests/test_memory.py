"""Enforced GPU memory per trial and the out-of-memory retry (mlfd.tune.memory), on CPU: the cap's arithmetic, the
micro-batch split of every batch size, the engine's gradient accumulation (the gradient of the full batch on a network
without BatchNorm; golden numbers on a real task with BatchNorm), the injected out-of-memory error, and the trial's
recipe rewritten for the retry with the store keys that must and must not change. The retry through ``mlfd tune`` end
to end is in test_tune.py; what needs a GPU (the cap enforced, a real over-size batch) in bench/gpu_check.sh."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT

from mlfd.config import RecipeSpec, load_pipeline
from mlfd.data.loader import batch_bounds
from mlfd.engine import accumulation_groups, accumulation_key, fit, inject_out_of_memory, is_out_of_memory
from mlfd.tune.memory import MicroBatch, free_memory, memory_cap, micro_batch
from mlfd.tune.packing import CONTEXT_RESERVE_BYTES, GIB

CPU = torch.device("cpu")
PIPELINE = ROOT / "pipelines" / "offline_default.yaml"


# --------------------------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------------------------


def test_memory_cap_is_the_share_less_the_context_reserve() -> None:
    assert CONTEXT_RESERVE_BYTES == 512 * 2**20
    assert memory_cap(0.25, 80 * GIB) == pytest.approx(0.25 - 0.5 / 80)  # 20 GiB share, 19.5 GiB for the allocator
    assert memory_cap(0.125, 141 * GIB) == pytest.approx(0.125 - 0.5 / 141)
    assert memory_cap(0.1, 4 * GIB) == 0.05  # a 0.4 GiB share is under the 0.5 GiB reserve: half the share
    assert memory_cap(0.9999, 80 * GIB) == pytest.approx(0.9999 - 0.5 / 80)
    for whole in (1.0, 2.0):
        assert memory_cap(whole, 80 * GIB) is None  # whole GPUs: no cap
    assert memory_cap(0.0, 80 * GIB) is None  # a CPU trial
    with pytest.raises(ValueError, match="total_bytes > 0"):
        memory_cap(0.5, 0)


def test_a_trial_gets_the_fraction_the_search_resolved(tmp_path: Path) -> None:
    """A trial's context carries the plan's GPU fraction (the job's, or ``gpu: auto`` as packing resolved it), which
    run_stage turns into its cap; on a CPU device there is nothing to cap."""
    from mlfd.tune.launch import prepare, trial_context
    from mlfd.tune.memory import apply_memory_cap

    plan = prepare(str(ROOT / "tune_jobs" / "quickstart.yaml"), tmp_path / "out", True, None)
    assert trial_context(plan, "digits")["gpu"] == 0.0  # resources.gpu: 0
    packed = dataclasses.replace(plan, gpu=0.1249)  # gpu: auto resolved to 1/8 (Ray's 0.0001 step)
    assert trial_context(packed, "digits")["gpu"] == 0.1249
    assert apply_memory_cap(0.1249, CPU) is None


@pytest.mark.parametrize("batch,accum,micro,steps,effective", [
    (128, 1, 64, 2, 128), (96, 1, 48, 2, 96), (256, 2, 128, 4, 512), (4, 1, 2, 2, 4),
    (129, 1, 43, 3, 129), (125, 1, 25, 5, 125), (49, 1, 7, 7, 49), (9, 3, 3, 9, 27),  # odd: the smallest divisor
    (127, 1, 64, 2, 128), (143, 1, 72, 2, 144), (5, 1, 3, 2, 6), (7, 1, 4, 2, 8),  # no divisor up to 8: one more
])
def test_micro_batch_of_every_batch_size(batch: int, accum: int, micro: int, steps: int, effective: int) -> None:
    m = micro_batch(batch, accum)
    assert (m.batch_size, m.grad_accum, m.effective) == (micro, steps, effective)
    assert m.split == steps // accum
    assert m.batch_size >= 2  # BatchNorm needs two samples per micro-batch in training mode
    same = effective == batch * accum
    assert m.describe().endswith("as before)" if same else f"was {batch * accum})"), m.describe()


def test_micro_batch_describes_itself_and_refuses_tiny_batches() -> None:
    assert micro_batch(128).describe() == ("batch 128 -> micro-batch 64 x 2 accumulation steps (effective batch 128, "
                                           "as before)")
    assert micro_batch(127).describe() == ("batch 127 -> micro-batch 64 x 2 accumulation steps (effective batch 128, "
                                           "was 127)")
    assert micro_batch(3) is None and micro_batch(1) is None  # a micro-batch of 1 cannot go through BatchNorm
    assert micro_batch(128) == MicroBatch(64, 2, 128, 1)
    with pytest.raises(ValueError):
        micro_batch(0)


def test_accumulation_groups_end_with_the_remainder() -> None:
    assert accumulation_groups(7, 1) == [1] * 7
    assert accumulation_groups(7, 2) == [2, 2, 2, 1]
    assert accumulation_groups(8, 4) == [4, 4]
    assert accumulation_groups(0, 3) == []
    assert accumulation_key(RecipeSpec()) == {}  # grad_accum 1: keys as before
    assert accumulation_key(RecipeSpec(grad_accum=2)) == {"accumulation": 2}


# --------------------------------------------------------------------------------------------------------------------
# The engine's accumulation
# --------------------------------------------------------------------------------------------------------------------


class _Mlp:
    """A 10 -> 5 MLP (no BatchNorm, no dropout) on ``n`` fixed samples in batches of ``batch`` (a training epoch's
    bounds: a lone last sample joins the batch before it)."""

    def __init__(self, batch: int, n: int = 210):
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 10, generator=g), torch.randint(0, 5, (n,), generator=g)
        self.bounds = batch_bounds(n, batch, train=True)
        self.calls = 0

    def steps_per_epoch(self) -> int:
        return len(self.bounds)

    def train_batches(self, epoch: int):
        for a, z in self.bounds:
            yield self.x[a:z], self.y[a:z]

    def train_step(self, batch):
        self.calls += 1
        ce = nn.functional.cross_entropy(self.module(batch[0]), batch[1])
        return {"loss": ce}

    def evaluate(self, split: str) -> dict[str, float]:
        return {"acc1": 0.0, "acc5": 0.0}


@pytest.mark.parametrize("n", [200, 210, 221], ids=["even", "short-last-group", "lone-sample-joined"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulated_micro_batches_train_like_the_full_batch(n: int, optimizer: str) -> None:
    """Batch 40 x 1 against micro-batch 20 x 2 accumulation steps, 3 epochs: the same samples in every optimizer step
    (n = 210 ends each epoch on a group of one micro-batch of 10, n = 221 on a last micro-batch of 21), so the same
    weights within 2e-6 (float32 summation order only). Tolerance: the largest difference of any weight."""
    recipe = RecipeSpec(optimizer=optimizer, lr=0.05, weight_decay=0.01, epochs=3, batch_size=40, warmup_epochs=0.5)
    full, micro = _Mlp(40, n), _Mlp(20, n)
    m = micro_batch(40)
    fit(full, recipe, CPU, progress=False)
    fit(micro, dataclasses.replace(recipe, batch_size=m.batch_size, grad_accum=m.grad_accum), CPU, progress=False)
    assert micro.calls == 3 * len(micro.bounds) and full.calls == 3 * len(full.bounds)
    assert accumulation_groups(len(micro.bounds), 2) == [2] * (len(full.bounds) - 1) + [
        len(micro.bounds) - 2 * (len(full.bounds) - 1)]
    diff = max((a - b).abs().max().item() for a, b in zip(full.module.parameters(), micro.module.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(full.module.parameters(), _Mlp(40).module.parameters()))
    assert diff < 2e-6 and moved > 1e-2, (diff, moved)


def test_golden_micro_batches_on_a_real_task_with_batchnorm(tmp_path: Path) -> None:
    """The digits teacher task (test_resnet, BatchNorm) for 2 epochs on 200 images: batch 32 x 1 gives the numbers
    it gave before accumulation was touched (the same to the last bit as main before this change, measured), and
    micro-batch 16 x 2 trains close to it but not bit for bit: BatchNorm sees the micro-batches."""
    from mlfd.stages.common import Context
    from mlfd.stages.teachers import ClassifierTask
    from mlfd.store import ArtifactStore

    torch.set_num_threads(1)
    spec = load_pipeline(PIPELINE, ["datasets.digits.model.arch=test_resnet", "datasets.digits.model.kwargs={}",
                                    "datasets.digits.max_train=200",
                                    "datasets.digits.max_val=100", "datasets.digits.max_test=100", "teacher.epochs=2",
                                    "teacher.batch_size=32"])
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    runs = {}
    for b, a in ((32, 1), (16, 2)):
        r = dataclasses.replace(spec.teacher_for("digits"), batch_size=b, grad_accum=a)
        task = ClassifierTask(ctx, "digits", spec.dataset("digits").model, r)
        res = fit(task, r, ctx.device, progress=False)
        runs[b] = (task.steps_per_epoch(), [(h["train/loss"], h["val/acc1"]) for h in res.history])
    assert runs[32][0] == 7 and runs[16][0] == 13  # 6 x 32 + 8; 12 x 16 + 8: the last step one micro-batch of 8
    assert runs[32][1] == [(pytest.approx(2.2364953586, abs=1e-6), 9.0), (pytest.approx(1.8017391818, abs=1e-6), 10.0)]
    assert runs[16][1] == [(pytest.approx(2.2588746181, abs=1e-6), 10.0), (pytest.approx(1.9023217788, abs=1e-6), 27.0)]
    assert abs(runs[16][1][0][0] - runs[32][1][0][0]) < 0.05  # the first epoch's mean loss: close, not equal


def test_injected_out_of_memory_stops_the_first_step_of_the_next_fit_only() -> None:
    recipe = RecipeSpec(optimizer="sgd", lr=0.05, epochs=1, batch_size=40)
    inject_out_of_memory(1)
    try:
        task = _Mlp(40)
        with pytest.raises(torch.OutOfMemoryError, match="injected") as e:
            fit(task, recipe, CPU, progress=False)
        assert is_out_of_memory(e.value) and task.calls == 0
        again = _Mlp(40)
        fit(again, recipe, CPU, progress=False)
        assert again.calls == len(again.bounds)
    finally:
        inject_out_of_memory(0)


def test_a_failed_attempt_is_freed_once_its_error_is_handled() -> None:
    """What the retry relies on: after the ``except`` block, the failed fit's model and optimizer state are
    collected (free_memory: gc, then the CUDA cache when there is one)."""
    refs = []

    def attempt() -> None:
        task = _Mlp(40)
        refs.append(weakref.ref(task.module))
        inject_out_of_memory(1)
        fit(task, RecipeSpec(optimizer="sgd", lr=0.05, epochs=1, batch_size=40), CPU, progress=False)

    try:
        try:
            attempt()
        except torch.OutOfMemoryError:
            assert refs[0]() is not None  # still held by the traceback here
    finally:
        inject_out_of_memory(0)
    free_memory()
    assert refs[0]() is None
    gc.collect()


# --------------------------------------------------------------------------------------------------------------------
# The trial's recipe for the retry, and the store keys
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,study", [("students", "digits"), ("teachers", "digits"), ("joint", None),
                                         ("multi_head", None)])
def test_micro_batched_changes_only_the_trials_recipe_and_key(stage: str, study: str | None, tmp_path: Path) -> None:
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial, micro_batched
    from mlfd.stages.teachers import teacher_key
    from mlfd.store import ArtifactStore

    spec = load_pipeline(PIPELINE, ["fusion_levels=[2]", "baselines.multi_head=true"])
    store = ArtifactStore(tmp_path / "store")
    before = StageTrial(Context(spec=spec, store=store, progress=False), stage, study)
    base = before.recipe()
    m = micro_batch(base.batch_size, base.grad_accum)
    small = micro_batched(spec, stage, study, m.batch_size, m.grad_accum)
    after = StageTrial(Context(spec=small, store=store, progress=False), stage, study)
    assert dataclasses.replace(after.recipe(), batch_size=base.batch_size, grad_accum=base.grad_accum) == base
    assert (after.recipe().batch_size, after.recipe().grad_accum) == (base.batch_size // 2, 2)
    assert after.output()[1] != before.output()[1]  # the trial's own artifact: another key
    names = [d.name for d in spec.datasets]
    teachers = [teacher_key(Context(spec=s, store=store, progress=False), n) for s in (spec, small) for n in names]
    if stage == "teachers":  # only the study's own teacher changes
        assert [a == b for a, b in zip(teachers[:3], teachers[3:])] == [n != study for n in names]
    else:
        assert teachers[:3] == teachers[3:]
    if stage == "students":  # its joint teacher (upstream) keeps its key
        assert after.joint_plan == before.joint_plan
        from mlfd.stages.joint import joint_key
        assert joint_key(after.ctx, after.joint_plan) == joint_key(before.ctx, before.joint_plan)
    for other in names:  # other datasets' student recipes are untouched
        if other != study:
            assert small.student_for(other) == spec.student_for(other)


# --------------------------------------------------------------------------------------------------------------------
# The retry of a trial (the loop of mlfd tune's trainable, without Ray)
# --------------------------------------------------------------------------------------------------------------------

TINY = ["datasets.digits.model.arch=test_resnet", "datasets.digits.max_train=120", "datasets.digits.max_val=60",
        "datasets.digits.max_test=60", "teacher.epochs=1", "teacher.batch_size=32"]


def _teacher_attempts(store: Path, seen: list):
    """An attempt that trains the digits teacher (a ``teachers`` trial), recording what it trained with and how many
    teacher tasks were still alive when it started."""
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore

    def attempt(spec, retry, fault: bool) -> None:
        from mlfd.stages.teachers import ClassifierTask

        alive = sum(isinstance(o, ClassifierTask) for o in gc.get_objects())  # a task (model, optimizer) not freed
        trial = StageTrial(Context(spec=spec, store=ArtifactStore(store), progress=False), "teachers", "digits")
        recipe = trial.recipe()
        seen.append((recipe.batch_size, recipe.grad_accum, retry, fault, alive))
        inject_out_of_memory(1 if fault else 0)
        try:
            trial.build()
        finally:
            inject_out_of_memory(0)

    return attempt


def test_a_trial_out_of_memory_is_retried_once_with_micro_batches(tmp_path: Path) -> None:
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial, micro_batched
    from mlfd.store import ArtifactStore
    from mlfd.tune.trainable import train_with_retry

    torch.set_num_threads(1)
    spec, seen = load_pipeline(PIPELINE, TINY), []
    retry = train_with_retry(spec, "teachers", "digits", str(tmp_path), _teacher_attempts(tmp_path, seen), faults=1)
    assert retry == {"micro_batch_size": 16, "accum_steps": 2, "error": "CUDA out of memory. Tried to allocate the "
                     "first training batch (injected by mlfd.engine.inject_out_of_memory)"}
    assert seen == [(32, 1, None, True, 0), (16, 2, retry, False, 0)]  # the first attempt's task was freed
    store = ArtifactStore(tmp_path)
    built = [StageTrial(Context(spec=s, store=store, progress=False), "teachers", "digits").artifact()
             for s in (spec, micro_batched(spec, "teachers", "digits", 16, 2))]
    assert built[0] is None and built[1] is not None  # under the micro-batched recipe's key only
    assert not list(tmp_path.glob("teacher/.*.tmp"))  # the failed attempt's build left nothing behind


def test_a_second_out_of_memory_fails_the_trial_with_one_line(tmp_path: Path) -> None:
    from mlfd.engine import OutOfMemory
    from mlfd.tune.trainable import train_with_retry

    torch.set_num_threads(1)
    seen = []
    with pytest.raises(OutOfMemory) as e:
        train_with_retry(load_pipeline(PIPELINE, TINY), "teachers", "digits", str(tmp_path),
                         _teacher_attempts(tmp_path, seen), faults=2)
    assert str(e.value) == ("teachers trial digits ran out of memory again after its retry with micro-batch 16 x 2 "
                            "accumulation steps (CUDA out of memory. Tried to allocate the first training batch "
                            "(injected by mlfd.engine.inject_out_of_memory)); lower the batch size or give it more "
                            "memory (resources.gpu)")
    assert [s[:2] for s in seen] == [(32, 1), (16, 2)]
    # A batch too small to split fails at once, saying so.
    with pytest.raises(OutOfMemory, match=r"ran out of GPU memory .*; its batch of 3 is too small to split$"):
        train_with_retry(load_pipeline(PIPELINE, [*TINY, "teacher.batch_size=3"]), "teachers", "digits",
                         str(tmp_path), _teacher_attempts(tmp_path, []), faults=1)
    # An error that is not about memory is not retried.

    def diverges(spec, retry, fault):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        train_with_retry(load_pipeline(PIPELINE, TINY), "teachers", "digits", str(tmp_path), diverges)


# --------------------------------------------------------------------------------------------------------------------
# What the search records (trials.parquet rows, the live view), from Ray's own result objects
# --------------------------------------------------------------------------------------------------------------------


def test_trial_rows_record_the_retry(tmp_path: Path) -> None:
    """oom_retries, micro_batch_size and accum_steps from the trial's last report; a trial whose retry failed too
    (it never reported) still counts its retry, from its error."""
    from ray.tune import Result

    from mlfd.search import load_job
    from mlfd.tune.trials import trial_rows

    job, _ = load_job(ROOT / "tune_jobs" / "quickstart.yaml", smoke=True)
    metrics = {"trial_id": "0a1b2c39", "experiment_tag": "1_x=1", "training_iteration": 3, "val/acc1": 50.0}
    plain = Result(metrics={**metrics, "oom_retries": 0, "micro_batch_size": 32, "accum_steps": 1}, checkpoint=None,
                   error=None, path=str(tmp_path / "a"))
    retried = Result(metrics={**metrics, "trial_id": "1b1b1b1b", "oom_retries": 1, "micro_batch_size": 16,
                              "accum_steps": 2}, checkpoint=None, error=None, path=str(tmp_path / "b"))
    failed = Result(metrics={}, checkpoint=None, path=str(tmp_path / "run_stage_77e3a8f1_2_x=1_2026"),
                    error=RuntimeError("mlfd.engine.OutOfMemory: students trial digits ran out of memory again after "
                                       "its retry with micro-batch 16 x 2 accumulation steps (...)"))
    rows = trial_rows([plain, retried, failed], "digits", job, max_epochs=3)
    assert [(r["oom_retries"], r["micro_batch_size"], r["accum_steps"], r["status"]) for r in rows] == [
        (0, 32, 1, "TERMINATED"), (1, 16, 2, "TERMINATED"), (1, None, None, "ERROR")]


def test_live_view_says_a_trial_was_retried(capsys: pytest.CaptureFixture) -> None:
    from types import SimpleNamespace as Trial

    from mlfd.cli import configure_logging
    from mlfd.tune.progress import LiveView

    result = {"training_iteration": 1, "val/acc1": 50.0, "oom_retries": 1, "micro_batch_size": 16, "accum_steps": 2}
    trial = Trial(trial_id="1b1b1b1b", experiment_tag="2_x=1", status="RUNNING", last_result=result,
                  metric_analysis={"val/acc1": {"max": 50.0}})
    restore = configure_logging()
    try:
        view = LiveView("digits", "val/acc1", "max", max_epochs=1)
        view.setup(total_num_samples=2)
        view.on_trial_result(0, [trial], trial, result)
        view.on_trial_result(0, [trial], trial, result)  # said once
        view.on_trial_result(0, [trial], trial, dict(result, oom_retries=0))
        view.on_trial_complete(0, [trial], trial)
        assert capsys.readouterr().err.splitlines()[:2] == [
            "  digits trial #2 (1b1b1b1b) ran out of memory; retried in the same trial with micro-batch 16 x 2 "
            "accumulation steps",
            "  digits trial #2 (1b1b1b1b) finished 1/1 epochs (after an out-of-memory retry, micro-batch 16), "
            "val/acc1 50.00 (best epoch)"]
    finally:
        restore()


# --------------------------------------------------------------------------------------------------------------------
# On a CUDA GPU (bench/gpu_check.sh runs these): the cap enforced, and the retry after a real over-size batch. Each
# runs in a child process: a memory fraction holds for the whole process.
# --------------------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _child(script: str, timeout: float = 240) -> dict:
    """Run ``script`` in a child Python process; it prints one JSON line last, returned as a dict."""
    import json
    import subprocess
    import sys

    from conftest import ENV

    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@cuda
def test_cuda_memory_cap_refuses_an_allocation_beyond_the_trials_share() -> None:
    """gpu 0.25: the allocator may hold 0.25 of the GPU less the context reserve. 1.1 x that fits before the cap is
    set, not after; 0.9 x fits under it; the refused allocation leaves the trial able to go on."""
    res = _child("""
import json, torch
from mlfd.tune.memory import apply_memory_cap
from mlfd.tune.memory import memory_cap
dev = torch.device("cuda")
total = torch.cuda.get_device_properties(0).total_memory
n = int(1.1 * memory_cap(0.25, total) * total)
x = torch.empty(n, dtype=torch.uint8, device=dev); before = True; del x; torch.cuda.empty_cache()
cap = apply_memory_cap(0.25, dev)
try:
    torch.empty(n, dtype=torch.uint8, device=dev); after = True
except torch.OutOfMemoryError:
    after = False
torch.cuda.empty_cache()
y = torch.empty(int(0.9 * cap * total), dtype=torch.uint8, device=dev)
print(json.dumps({"cap": cap, "total": total, "before": before, "after": after, "held": torch.cuda.memory_reserved()}))
""")
    from mlfd.tune.packing import CONTEXT_RESERVE_BYTES

    assert res["cap"] == pytest.approx(0.25 - CONTEXT_RESERVE_BYTES / res["total"])
    assert res["before"] and not res["after"], res
    assert 0.9 * res["cap"] * res["total"] <= res["held"] <= res["cap"] * res["total"], res


@cuda
def test_cuda_retry_after_a_real_over_size_batch() -> None:
    """The digits teacher (test_resnet, all of digits on the GPU) at batch 1024, under a cap between the peaks of
    batch 1024 and of micro-batch 512 x 2 (both measured first, uncapped): the first attempt runs out of memory for
    real, the retry trains with 512 x 2 under the cap, and it starts with the first attempt's memory freed."""
    res = _child(f"""
import dataclasses, json, tempfile, torch
from mlfd.config import load_pipeline
from mlfd.engine import fit
from mlfd.stages.common import Context
from mlfd.stages.teachers import ClassifierTask
from mlfd.stages.trial import StageTrial
from mlfd.store import ArtifactStore
from mlfd.tune.memory import apply_memory_cap, free_memory
from mlfd.tune.packing import CONTEXT_RESERVE_BYTES, LimitedTask
from mlfd.tune.trainable import train_with_retry
torch.set_num_threads(4)
dev = torch.device("cuda")
store = tempfile.mkdtemp()
spec = load_pipeline("{PIPELINE}", ["datasets.digits.model.arch=test_resnet", "teacher.epochs=1",
                                    "teacher.batch_size=1024", "device=cuda"])
ctx = Context(spec=spec, store=ArtifactStore(store), progress=False)
def peak(b, a):
    free_memory(); torch.cuda.reset_peak_memory_stats()
    r = dataclasses.replace(spec.teacher_for("digits"), batch_size=b, grad_accum=a)
    task = ClassifierTask(ctx, "digits", spec.dataset("digits").model, r)
    fit(LimitedTask(task, 2 * a), r, dev, progress=False)
    del task
    free_memory()
    return torch.cuda.max_memory_allocated()
full, half = peak(1024, 1), peak(512, 2)
total = torch.cuda.get_device_properties(0).total_memory
cap_bytes = half + 0.6 * (full - half)
fraction = (cap_bytes + CONTEXT_RESERVE_BYTES if cap_bytes >= CONTEXT_RESERVE_BYTES else 2 * cap_bytes) / total
cap = apply_memory_cap(fraction, dev)  # memory_cap(fraction) is cap_bytes / total
seen = []
def attempt(s, retry, fault):
    seen.append((s.teacher_for("digits").batch_size, torch.cuda.memory_allocated()))
    torch.cuda.reset_peak_memory_stats()
    StageTrial(Context(spec=s, store=ArtifactStore(store), progress=False), "teachers", "digits").build()
base = torch.cuda.memory_allocated()
retry = train_with_retry(spec, "teachers", "digits", store, attempt)
print(json.dumps({{"full": full, "half": half, "cap": cap * total, "cap_bytes": cap_bytes, "retry": retry,
                  "seen": seen, "base": base, "peak": torch.cuda.max_memory_reserved()}}))
""", timeout=400)
    assert res["full"] > 1.3 * res["half"], res  # the activations dominate: halving the batch frees memory
    assert res["cap"] == pytest.approx(res["cap_bytes"], rel=1e-3)
    assert res["retry"] is not None and (res["retry"]["micro_batch_size"], res["retry"]["accum_steps"]) == (512, 2)
    assert "out of memory" in res["retry"]["error"].lower(), res["retry"]
    assert [b for b, _ in res["seen"]] == [1024, 512]
    assert res["seen"][1][1] <= res["base"] + 2**20, res  # the first attempt's model and batches were freed
    assert res["peak"] <= res["cap"], res
