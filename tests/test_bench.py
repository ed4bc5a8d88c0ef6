"""The benchmarks' pure helpers (bench/*.py), and one real --quick run (slow).

Each bench script is too slow for the default suite as a whole; what turns measurements into the printed ratios is
checked here with numbers worked out by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENV, ROOT

from bench import (cache, collect, common, input_pipeline, memory, out_of_core, overhead, packing,  # noqa: E402
                   scaling, trial_throughput)


def test_table():
    out = common.table([{"a": 1, "b": 0.123456, "c": 12345.6}, {"a": None, "b": 2.0, "c": "x"}])
    lines = out.splitlines()
    assert lines[0].split() == ["a", "b", "c"] and lines[2].split() == ["1", "0.123", "12,346"]
    assert lines[3].split() == ["-", "2", "x"]


def test_load_spec_overrides_win_over_smoke():
    spec = common.load_spec(True, ["student.recipe.batch_size=64"])
    assert spec.student.recipe.batch_size == 64  # the smoke variant caps it at 32; the override comes after
    assert spec.datasets[0].max_train == 300


def test_raw_loop_uses_the_recipe_settings():
    loop = common.RawLoop("test_resnet", 16, 4, 3, torch.device("cpu"), common.RecipeSpec(channels_last="on"))
    assert loop.dtype is None and loop.channels_last
    assert loop.x.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(loop.opt, torch.optim.AdamW)
    assert loop.throughput(steps=2, warmup=1) > 0


def test_trial_throughput_helpers():
    hist = [{"train/time_s": 9.0}, {"train/time_s": 2.0}, {"train/time_s": 4.0}, {"train/time_s": 3.0}]
    assert trial_throughput.img_per_s(hist, steps=10, batch=32) == pytest.approx(320 / 3.0)  # first epoch left out
    case = trial_throughput.Case("fashion", "resnet18", 224, 256, steps=25)
    assert case.label == "resnet18@224 bs256"
    over = case.overrides(quick=False)
    assert "datasets.fashion.student_model={arch: resnet18, input_size: 224}" in over
    assert "datasets.fashion.max_train=null" in over and "datasets.fashion.max_train=null" not in case.overrides(True)
    gpu_cases = trial_throughput.cases(False, torch.device("cuda"))
    assert [c.label for c in gpu_cases] == ["resnet18@32 bs256", "resnet18@224 bs256"]


def test_packing_gain_arithmetic():
    # the reference H200 figures (gpu-ceilings.json): raw 32084 -> 135727 img/s at k = 8, i.e. 4.23x
    raw = packing.gains({1: 32084.0, 8: 135727.0})
    ours = packing.gains({1: 30000.0, 8: 120000.0})
    frac, strict = packing.kept(ours[8], raw[8])
    assert raw[8] == pytest.approx(4.2304, abs=1e-4) and ours[8] == 4.0
    assert frac == pytest.approx(4.0 / 4.2304, abs=1e-4)
    assert strict == pytest.approx(3.0 / 3.2304, abs=1e-4)
    assert packing.kept(1.0, 1.0)[1] != packing.kept(1.0, 1.0)[1]  # nan when raw gains nothing
    assert packing.trial_img_per_s([10.0, 2.0, 4.0], 1000) == pytest.approx(1000 / 3.0)
    assert packing.settings(False, torch.device("cuda"))["ks"] == [1, 2, 4, 8]
    assert packing.settings(True, torch.device("cpu"))["ks"] == [1, 2]


def test_overhead_figures():
    fig = overhead.overhead_figures(search_s=130.0, plain_s=100.0, trial_s=[20.0, 30.0, 25.0])
    assert fig["overhead_per_trial_s"] == 10.0 and fig["mean_trial_s"] == 25.0
    assert fig["overhead_fraction"] == 0.4 and fig["overhead_fraction_60s_trial"] == pytest.approx(10 / 60)
    split = overhead.split_overhead({"search_s": 50.0, "plain_s": 20.0, "trial_s": [10.0, 10.0]},
                                    {"search_s": 86.0, "plain_s": 40.0, "trial_s": [10.0] * 4})
    assert split["marginal_overhead_per_trial_s"] == 8.0 and split["fixed_overhead_s"] == 14.0  # 30 = 14 + 2 x 8
    assert split["marginal_fraction_60s_trial"] == pytest.approx(8 / 60)
    over = overhead.search_overrides(3, Path("/tmp/s"), 0.0)
    assert "num_samples=3" in over and "max_concurrent_trials=1" in over and "scheduler={type: none}" in over


def test_in_trainable_seconds_reads_the_last_result_of_each_trial(tmp_path):
    for trial, totals in (("t1", [1.0, 2.5]), ("t2", [4.0])):
        d = tmp_path / "ray" / "exp" / trial
        d.mkdir(parents=True)
        (d / "result.json").write_text("\n".join(json.dumps({"time_total_s": t}) for t in totals) + "\n")
    assert overhead.in_trainable_seconds(tmp_path) == 6.5


def test_scaling_linear_fit():
    assert scaling.linear_fit([1, 2, 4], [3.0, 5.0, 9.0]) == pytest.approx((2.0, 1.0))
    over = scaling.small_overrides(2, [1, 2], 200)
    assert "fusion_levels=[1, 2]" in over and "datasets.digits.max_train=200" in over


def test_memory_level_bytes_from_level_shapes():
    lv = memory.level_bytes("test_resnet", 32)
    assert lv[1] == ((96,), 192) and lv[3] == ((192, 2, 2), 2 * 192 * 4)  # float16: 2 bytes per value


def test_cache_settings():
    gpu = cache.settings(False, torch.device("cuda"))
    assert "datasets.digits.model={arch: seresnext26d_32x4d, input_size: 224}" in gpu["overrides"]
    assert gpu["batches"] == [256, 2048]


def test_out_of_core_spec_grows_every_split_and_ratios():
    spec = out_of_core.bench_spec(4, 100, False)
    assert [(d.max_train, d.max_val, d.max_test) for d in spec.datasets] == [(400, 100, 100)] * 2
    assert spec.fusion_levels == [4] and spec.datasets[0].model.input_size == 32
    assert out_of_core.bench_spec(1, 100, False, 64).datasets[1].model.input_size == 64
    assert spec.joint.cache_on_device is False and out_of_core.bench_spec(1, 100, True).joint.cache_on_device is True
    rows = [{"mode": "build", "scale": 16, "x": 3.0}, {"mode": "build", "scale": 1, "x": 2.0},
            {"mode": "collect", "scale": 1, "x": 9.0}, {"mode": "collect", "scale": 16, "x": 18.0}]
    assert out_of_core.ratio(rows, "build", "x") == 1.5 and out_of_core.ratio(rows, "collect", "x") == 2.0


def test_collect_writes_json_and_appends_markdown(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    env = {"date": "2026-01-01T00:00:00Z", "host": "h", "machine": "x86_64, 2 CPUs", "device": "cpu",
           "versions": {"torch": "2.x"}, "commit": "abc", "torch_threads": 1, "loadavg_1m": 1.0}
    (run / "cache.json").write_text(json.dumps({"bench": "cache", "command": "python bench/cache.py --quick",
                                                "summary": "11x", "env": env,
                                                "rows": [{"joint_batch": 64, "speedup": 11.1, "x": [1]}]}))
    (run / "packing.log").write_text("boom\nTraceback\nRuntimeError: no")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nearlier\n")
    collect.main([str(run), str(tmp_path / "all.json"), str(md), "--label", "CPU, --quick"])
    data = json.loads((tmp_path / "all.json").read_text())
    assert list(data) == ["packing", "cache"] and "RuntimeError: no" in data["packing"]["error"]
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\nearlier\n") and "## CPU, --quick" in text
    assert "`python bench/cache.py --quick`" in text and "| joint_batch | speedup |" in text
    assert "FAILED" in text and "1-min load average at start: 1.0" in text


def test_input_pipelines_deliver_every_image_as_the_same_batches(tmp_path):
    """The three pipelines input_pipeline.py times each deliver a whole epoch of normalized float batches of one
    shape; mlfd's streamed and in-memory ones give the very same tensors."""
    assert input_pipeline.write_tree(tmp_path, 37).endswith(", 37 images")
    assert len(list(tmp_path.rglob("*.png"))) == 37
    cpu = torch.device("cpu")
    for make in (lambda: input_pipeline.ours(tmp_path, 32, 8, 2, cpu, stream=True),
                 lambda: input_pipeline.ours(tmp_path, 32, 8, 0, cpu, stream=False),
                 lambda: input_pipeline.raw_pipeline(tmp_path, 32, 8, 2, cpu)):
        epoch = make()
        assert epoch() == 37 and epoch() == 37
    batches = {}
    for stream in (True, False):
        opts = {"root": str(tmp_path), "mode": "L", "stream": stream, "workers": 2}
        raw = input_pipeline.SOURCES["folder"](opts, "t")
        loader = input_pipeline.make_loader(raw.train.images, raw.train.labels, 8, True, seed=0, device=cpu)
        tf = input_pipeline.BatchTransform(32, input_pipeline.MEAN, input_pipeline.STD)
        batches[stream] = [tf(x, train=False) for _, x, _ in loader]
    assert [b.shape for b in batches[True]] == [(8, 3, 32, 32)] * 4 + [(5, 3, 32, 32)]
    assert all(torch.equal(a, b) for a, b in zip(batches[True], batches[False], strict=True))


@pytest.mark.slow
def test_cache_bench_quick_runs(tmp_path):
    out = tmp_path / "cache.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cache.py"), "--quick", "--json", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["bench"] == "cache" and rec["quick"] and rec["ratio"] > 1  # the cache is faster even on a CPU
    assert "faster than through the frozen teachers" in proc.stdout


@pytest.mark.slow
def test_probe_batch_bench_runs(tmp_path):
    """bench/probe_batch.py at tiny batches: one row per T1 architecture of --quick, img/s at both batches, the ratio."""
    out = tmp_path / "probe_batch.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_batch.py"), "--quick", "--probe", "2",
                           "--full", "4", "--json", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert [(r["arch"], r["probe_batch"], r["batch"]) for r in rec["rows"]] == [("resnet18", 2, 4),
                                                                                ("efficientnet_b0", 2, 4)]
    for r in rec["rows"]:
        assert r["probe_img_s"] > 0 and r["img_s"] > 0
        assert r["probe_over_full"] == pytest.approx(r["probe_img_s"] / r["img_s"], rel=0.02)
    assert rec["summary"].startswith("img/s at batch 2 over img/s at the larger batch: resnet18 ")
