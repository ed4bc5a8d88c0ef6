"""Ray Tune function trainables: each stage of the pipeline, reporting every epoch, checkpointing, resumable.

A trial's config is the flat sampled parameters; the job's context (the pipeline dict, the stage, the study, where the
store lives) reaches the trainable through ``tune.with_parameters``, so it stays out of the progress table. The
trainable applies the sampled values to the pipeline, builds the upstream artifacts it needs (what a trial trains
and reads: :class:`mlfd.stages.trial.StageTrial`)
through the shared store (built once, under a lock, whichever trial asks first), then trains its own stage with
``ray.tune.report`` after each epoch.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mlfd.config import PipelineSpec, SpecError, from_dict

if TYPE_CHECKING:
    from mlfd.stages.common import Context

STATE_FILE = "state.pt"


def trial_spec(config: dict, context: dict) -> PipelineSpec:
    """The pipeline of one trial: the job's pipeline with the trial's sampled values applied, validated.

    A trial of a stage that trains one fusion level must name exactly one (``launch.prepare`` refuses a space that
    would leave several; this guards callers that skip it), rather than silently train the first.
    """
    from mlfd.tune.spaces import FUSION_LEVEL, LEVEL_STAGES, apply_config

    spec = from_dict(PipelineSpec, apply_config(context["pipeline"], config), path="trial")
    if context.get("stage") in LEVEL_STAGES and len(spec.fusion_levels) != 1:
        raise SpecError(f"trial.fusion_levels: a {context['stage']} trial trains one fusion level, got "
                        f"{spec.fusion_levels}; search {FUSION_LEVEL!r} or set fusion_levels to one level")
    return spec


NODE_KEY = "node"
"""Result key of the Ray node id a trial reported from (Tune itself adds ``node_ip`` and ``hostname``)."""


def node_id() -> str:
    """The Ray node this trial runs on: its id, unique even when every node shares one IP (a simulated cluster)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _report_history(history: list[dict], reused: bool = True, extra: dict | None = None) -> None:
    """Replay a finished artifact's epochs (the same config was already trained by another trial or run)."""
    from ray import tune

    node = node_id()
    for m in history:
        tune.report(dict(m, reused=int(reused), **(extra or {}), **{NODE_KEY: node}))


LATENCY_KEY = "latency_batch_size"
"""Context key: the batch size a students trial measures its student's latency at (absent: no latency)."""


def trial_cost(ctx: Context, stage: str, study: str | None, latency_batch_size: int | None) -> dict:
    """The cost metrics a trial reports with every epoch: a students trial's ``student/params`` (and
    ``student/latency_ms`` at ``latency_batch_size``); none for other stages."""
    from mlfd.stages.cost import student_cost

    if stage != "students":
        return {}
    return student_cost(ctx.spec.dataset(study).student_net, ctx.data(study).num_classes, ctx.device,
                        latency_batch_size)


def stage_epochs(spec: PipelineSpec, stage: str) -> int:
    """Epochs a trial of ``stage`` trains (the scheduler's max_t)."""
    if stage == "students":  # per-dataset overrides may differ: the longest bounds the scheduler
        return max(spec.student_for(d.name).recipe.epochs for d in spec.datasets)
    if stage == "joint":
        return spec.joint.recipe.epochs
    if stage in ("multi_head", "joint_head") and spec.baselines.recipe is not None:
        return spec.baselines.recipe.epochs
    return max(spec.teacher_for(d.name).epochs for d in spec.datasets)


def run_stage(config: dict, context: dict) -> None:
    """The function trainable for every stage (``context['stage']`` says which)."""
    import torch
    from ray import tune

    from mlfd.engine import is_out_of_memory, out_of_memory
    from mlfd.stages.common import Context, read_metrics
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore, load_torch, save_torch

    meta = context
    spec = trial_spec(config, context)
    stage, study = meta["stage"], meta.get("study")
    torch.set_num_threads(max(1, int(meta.get("threads", 1))))
    ctx = Context(spec=spec, store=ArtifactStore(meta["store"]), progress=False)

    def report(metrics: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_torch(state, Path(d) / STATE_FILE)
            tune.report(dict(metrics, **cost, **{NODE_KEY: node_id()}), checkpoint=tune.Checkpoint.from_directory(d))

    # The last epoch is reported only once the artifact (best weights, test metrics) is in the store: schedulers stop
    # a trial as soon as it reports its last epoch (ASHA at max_t), which would kill it before the artifact is saved.
    last_epoch = stage_epochs(spec, stage) - 1
    final: dict = {}

    def on_epoch(epoch: int, metrics: dict, get_state) -> None:
        if epoch >= last_epoch:
            final.update(metrics=dict(metrics), state=get_state())
        else:
            report(metrics, get_state())

    ckpt = tune.get_checkpoint()
    resume = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_torch(Path(d) / STATE_FILE)
    trial = StageTrial(ctx, stage, study)
    cost: dict = {}
    try:
        cost.update(trial_cost(ctx, stage, study, meta.get(LATENCY_KEY)))  # the same at every epoch
        existing = trial.artifact()
        if existing is not None:
            # Built by another trial or run (replay its epochs), or by this trial before its final report was
            # recorded (replay the epochs after its checkpoint).
            history = read_metrics(existing)["history"]
            _report_history(history if resume is None else history[resume["epoch"] + 1:], reused=resume is None,
                            extra=cost)
            return
        trial.build_upstream()  # teachers, caches, T*: built once in the store, not reported
        ctx.on_epoch, ctx.resume = on_epoch, resume
        trial.build()
        if final:
            report(final["metrics"], final["state"])
    except Exception as e:
        if is_out_of_memory(e):  # the trial fails with a reason that says so (trials.parquet, MLflow tag)
            raise out_of_memory(e, f"{stage} trial {study or ''}".strip()) from None
        raise
    finally:
        # Free CUDA memory promptly when ASHA stops a trial or it ends (the worker process may be reused).
        del ctx, trial
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["LATENCY_KEY", "run_stage", "stage_epochs", "trial_cost", "trial_spec"]
