"""Memory-aware packing of trials on fractional GPUs (mlfd/tune/packing/, design.md section 3).

The arithmetic is checked with real numbers (an H200's 143,771 MiB, the 0.29 GiB peak of a ResNet-18 trial at 32 px
from shared/reference/gpu-ceilings.json); the dry run on CPU here (its GPU path is the same code with CUDA memory
statistics) and on CUDA where there is one; `mlfd tune` with a GPU fraction on this machine without GPUs exits 2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT

from mlfd.config import SpecError, load_pipeline, smoke_pipeline  # noqa: E402
from mlfd.tune import packing  # noqa: E402
from mlfd.tune.packing import (GIB, MIB, LimitedTask, ProbeResult, auto_fraction, check_packing,  # noqa: E402
                               fraction_for, memory_worst_config, packed_per_gpu, plan_gpu, trials_per_gpu)

H200 = 143_771 * MIB
RESNET18_32PX = int(0.29 * GIB)


# --------------------------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------------------------


def test_trials_per_gpu_real_numbers():
    # 0.9 * 143771 MiB / (296.96 MiB + 512 MiB context) = 159.9
    assert trials_per_gpu(RESNET18_32PX, H200) == 159
    assert trials_per_gpu(20 * GIB, 80 * GIB) == 3  # 72 / 20.5
    assert trials_per_gpu(20 * GIB, 80 * GIB, headroom=1.0, reserve_bytes=0) == 4
    assert trials_per_gpu(79 * GIB, 80 * GIB) == 0
    with pytest.raises(ValueError):
        trials_per_gpu(GIB, 0)


@pytest.mark.parametrize("fraction, packs", [(0.125, 8), (0.25, 4), (0.3333, 3), (0.5, 2), (1, 1), (2, 1),
                                             (0.3, 3), (1 / 3, 3)])
def test_packed_per_gpu(fraction, packs):
    assert packed_per_gpu(fraction) == packs


def test_fraction_for_is_ray_granular_and_packs_n():
    assert fraction_for(1) == 1.0
    assert fraction_for(3) == pytest.approx(0.3333)
    assert fraction_for(8) == 0.125
    for n in range(1, 40):
        assert packed_per_gpu(fraction_for(n)) == n
        assert n * fraction_for(n) <= 1.0 + 1e-12


def test_check_packing_accepts_what_fits():
    check_packing(0.125, RESNET18_32PX, H200)  # 8 of 159 possible
    check_packing(0.25, 20 * GIB, 140 * GIB)  # 4 of 6
    check_packing(1, 70 * GIB, 80 * GIB)


def test_check_packing_refusal_message():
    with pytest.raises(SpecError) as e:
        check_packing(0.125, 20 * GIB, 80 * GIB)
    assert str(e.value) == ("resources.gpu: 0.125 packs 8 trials per GPU but one trial peaks at 20.00 GiB (+0.50 GiB "
                            "CUDA context) and the GPU has 80.00 GiB (90% usable); at most 3 fit, use gpu: 0.3333 "
                            "(1/3) or more, or gpu: auto")


def test_check_packing_one_fits_and_none_fits():
    with pytest.raises(SpecError, match=r"at most 1 fit, use gpu: 1 or more"):
        check_packing(0.5, 50 * GIB, 80 * GIB)
    with pytest.raises(SpecError, match=r"resources.gpu: 1: one trial peaks at 79.00 GiB .* does not fit even alone"):
        check_packing(1, 79 * GIB, 80 * GIB)


def test_auto_fraction():
    assert auto_fraction(RESNET18_32PX, H200) == 0.125  # 159 fit, capped at MAX_AUTO_TRIALS = 8
    assert auto_fraction(RESNET18_32PX, H200, max_trials=16) == 0.0625
    assert auto_fraction(20 * GIB, 80 * GIB) == pytest.approx(0.3333)
    assert auto_fraction(50 * GIB, 80 * GIB) == 1.0
    with pytest.raises(SpecError, match="resources.gpu: auto: .* does not fit even alone"):
        auto_fraction(100 * GIB, 80 * GIB)


# --------------------------------------------------------------------------------------------------------------------
# The launcher's side
# --------------------------------------------------------------------------------------------------------------------


def _space():
    from mlfd.tune.spaces import load_space

    return load_space(ROOT / "search_spaces" / "students.yaml")


def test_memory_worst_config_of_the_students_space():
    cfg = memory_worst_config(_space())
    assert cfg["fusion_level"] == 4
    assert all(cfg[f"student.betas.{c}"] == 1.0 for c in (1, 2, 3, 4))  # every level distilled
    assert cfg["student.recipe.lr"] == pytest.approx((1e-4 * 1e-2) ** 0.5)  # log-scale: geometric midpoint


def _job(gpu, max_concurrent=2):
    from mlfd.search import JobSpec, ResourcesSpec

    return JobSpec(pipeline="p.yaml", space="s.yaml", resources=ResourcesSpec(cpu=1, gpu=gpu),
                   max_concurrent_trials=max_concurrent)


class FakeProbe:
    def __init__(self, peak, total=80 * GIB):
        self.peak, self.total, self.calls = peak, total, []

    def __call__(self, spec, stage, studies, device):
        self.calls.append((spec, stage, studies, device))
        return ProbeResult(device="cuda:0", phases={"trial:mnist": {"peak_bytes": self.peak}, "teacher:mnist":
                                                    {"peak_bytes": self.peak // 2}}, total_bytes=self.total,
                           device_name="Fake GPU")


@pytest.fixture(scope="module")
def smoke_pipeline_dict():
    from mlfd.config import read_yaml

    return read_yaml(ROOT / "pipelines" / "offline_default.yaml")


def test_plan_gpu_zero_runs_no_dry_run(smoke_pipeline_dict):
    fake = FakeProbe(GIB)
    assert plan_gpu(_job(0), smoke_pipeline_dict, _space(), ["mnist"], probe_fn=fake) == 0.0
    assert fake.calls == []


def test_plan_gpu_checks_and_resolves(smoke_pipeline_dict):
    lines = []
    fake = FakeProbe(20 * GIB)
    with pytest.raises(SpecError, match="resources.gpu: 0.25 packs 4 trials per GPU .* at most 3 fit"):  # 72/20.5
        plan_gpu(_job(0.25), smoke_pipeline_dict, _space(), ["mnist"], probe_fn=fake, log=lines.append)
    spec, stage, studies, device = fake.calls[-1]
    assert (stage, studies, device) == ("students", ["mnist"], "cuda")
    assert spec.fusion_levels == [4]  # dry-run at the space's memory-worst corner
    assert plan_gpu(_job("auto"), smoke_pipeline_dict, _space(), ["mnist"], probe_fn=fake,
                    log=lines.append) == pytest.approx(0.3333)
    assert "one trial peaks at 20.00 GiB (trial:mnist" in lines[-1] and "3 trials per GPU" in lines[-1]
    assert "max_concurrent_trials caps it at 2" in lines[-1]
    assert plan_gpu(_job(0.5), smoke_pipeline_dict, _space(), ["mnist"], probe_fn=fake, log=lines.append) == 0.5


def test_limited_task_cuts_the_epoch():
    class T:
        module = torch.nn.Linear(2, 2)

        def steps_per_epoch(self):
            return 10

        def train_batches(self, epoch):
            yield from range(10)

    lt = LimitedTask(T(), 3)
    assert lt.steps_per_epoch() == 3 and list(lt.train_batches(0)) == [0, 1, 2]
    assert LimitedTask(T(), 50).steps_per_epoch() == 10


# --------------------------------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dry run on CUDA measures GPU memory: no GPU here")
def test_probe_on_cuda():
    spec = smoke_pipeline(load_pipeline(ROOT / "pipelines" / "offline_default.yaml"))
    peak = packing.probe(spec, "students", ["mnist"], "cuda").peak_bytes
    assert 1 * MIB < peak < 40 * GIB
    assert torch.cuda.memory_reserved() == 0  # the driver (this process) took no GPU memory


@pytest.mark.slow
def test_probe_on_cpu_measures_every_phase():
    """The dry run's code path on CPU (peak RSS instead of CUDA statistics): stand-in upstream, every phase."""
    spec = smoke_pipeline(load_pipeline(ROOT / "pipelines" / "offline_default.yaml"))
    res = packing.probe(spec, "students", ["mnist"], "cpu", threads=1)
    assert list(res.phases) == ["teacher:mnist", "teacher:fashion", "teacher:digits", "upstream:mnist", "trial:mnist"]
    assert all(100 * MIB < p["peak_bytes"] < 16 * GIB for p in res.phases.values())
    assert res.peak_bytes == max(p["peak_bytes"] for p in res.phases.values()) and res.total_bytes == 0


def test_probe_reports_bad_input_as_spec_error(tmp_path):
    spec = smoke_pipeline(load_pipeline(ROOT / "pipelines" / "offline_default.yaml"))
    with pytest.raises(SpecError, match="dataset: unknown 'nope'"):
        packing.probe(spec, "teachers", ["nope"], "cpu", threads=1)


# --------------------------------------------------------------------------------------------------------------------
# `mlfd tune` on this machine
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("gpu", ["0.25", "auto"])
def test_mlfd_tune_gpu_fraction_without_gpu_exits_2(tmp_path, gpu):
    proc = subprocess.run([sys.executable, "-m", "mlfd.cli", "tune", str(ROOT / "tune_jobs" / "quickstart.yaml"),
                           "--smoke", "--set", f"resources.gpu={gpu}", "--out", str(tmp_path / "out")],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"mlfd: error: resources.gpu: {gpu!r} asks for GPUs but this machine has none; run with --set "
                    "resources.gpu=0 to use CPUs").replace("'0.25'", "0.25")
    assert not (tmp_path / "out" / "search.json").exists()  # refused before anything started
