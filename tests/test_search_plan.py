"""``mlfd.search.SearchPlan``: the typed prepared search that OUT/search.json holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlfd.config import PipelineSpec, read_yaml, spec_hash, to_dict
from mlfd.errors import SpecError
from mlfd.search import SEARCH_FILE, JobSpec, ResourcesSpec, SearchPlan

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "offline_default.yaml"


def _plan(tmp_path: Path, gpu: float = 0.25) -> SearchPlan:
    job = JobSpec(pipeline=str(PIPELINE), space="students.yaml", name="q", num_samples=3,
                  resources=ResourcesSpec(cpu=2.0, gpu="auto"))
    return SearchPlan(job=job, pipeline=read_yaml(PIPELINE), studies=["mnist", "digits"],
                      job_file=str(tmp_path / "job.yaml"), pipeline_file=str(PIPELINE),
                      space_file=str(ROOT / "search_spaces" / "students.yaml"), storage_path=str(tmp_path / "ray"),
                      store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", gpu=gpu)


def test_round_trip_through_search_json(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    f = plan.save(tmp_path)
    assert f == tmp_path / SEARCH_FILE
    back = SearchPlan.load(tmp_path)
    assert back.to_dict() == plan.to_dict()
    assert back.job.resources.gpu == "auto" and back.job.resources.cpu == 2 and back.gpu == 0.25
    assert back.fingerprint() == plan.fingerprint() == SearchPlan.saved_fingerprint(tmp_path)
    # The fingerprint is the one search.json files written before the typed plan carry (--resume of those works).
    assert plan.fingerprint() == spec_hash({"job": to_dict(plan.job), "pipeline": plan.pipeline,
                                            "studies": ["mnist", "digits"]})
    assert isinstance(back.spec, PipelineSpec) and [d.name for d in back.spec.datasets] == ["mnist", "fashion",
                                                                                            "digits"]
    assert back.experiment_name("mnist") == "q-mnist" and back.experiment_name(None) == "q-students"


def test_changed_search_has_another_fingerprint(tmp_path: Path) -> None:
    a, b = _plan(tmp_path), _plan(tmp_path)
    b.job.num_samples = 4
    assert a.fingerprint() != b.fingerprint()
    c = _plan(tmp_path, gpu=0.5)  # the resolved packing is not part of what the user asked for
    assert c.fingerprint() == a.fingerprint()


def test_plan_without_gpu_takes_the_jobs_fraction(tmp_path: Path) -> None:
    data = _plan(tmp_path).to_dict()
    del data["gpu"]
    data["job"]["resources"]["gpu"] = 0.5
    assert SearchPlan.from_dict(data).gpu == 0.5
    data["job"]["resources"]["gpu"] = "auto"
    assert SearchPlan.from_dict(data).gpu == 0.0


def test_missing_or_broken_search_json_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"no search here \(search.json missing"):
        SearchPlan.load(tmp_path)
    (tmp_path / SEARCH_FILE).write_text("{not json")
    with pytest.raises(SpecError, match="not readable JSON"):
        SearchPlan.load(tmp_path)
    (tmp_path / SEARCH_FILE).write_text(json.dumps({"job": {"metric": "val/acc1"}}))
    with pytest.raises(SpecError, match="not a search plan written by mlfd tune .missing pipeline, studies"):
        SearchPlan.load(tmp_path)
    data = _plan(tmp_path).to_dict()
    data["job"]["mode"] = "sideways"
    (tmp_path / SEARCH_FILE).write_text(json.dumps(data))
    with pytest.raises(SpecError, match="job.mode"):
        SearchPlan.load(tmp_path)
