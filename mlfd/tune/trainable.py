"""Ray Tune function trainables: each stage of the pipeline, reporting every epoch, checkpointing, resumable.

A trial's config is the flat sampled parameters; the job's context (the pipeline dict, the stage, the study, where the
store lives) reaches the trainable through ``tune.with_parameters``, so it stays out of the progress table. The
trainable applies the sampled values to the pipeline, builds the upstream artifacts it needs (what a trial trains
and reads: :class:`mlfd.stages.trial.StageTrial`)
through the shared store (built once, under a lock, whichever trial asks first), then trains its own stage with
``ray.tune.report`` after each epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mlfd.config import PipelineSpec, SpecError, from_dict

if TYPE_CHECKING:
    from mlfd.stages.common import Context

STATE_FILE = "state.pt"

_logger = logging.getLogger(__name__)


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


OOM_FAULT_ENV = "MLFD_FAULT_OOM"
"""Fault injection of the tests: with ``MLFD_FAULT_OOM=N`` the first N training attempts of every trial raise
``torch.OutOfMemoryError`` at their first step (1: the retry runs and succeeds; 2: the retry fails too). Unset: none."""
RETRY_STATE = "oom_retry"
"""Key of a trial's checkpoint state holding its retry (micro-batch size, accumulation steps), so that a restored
trial continues with the recipe its checkpoint was trained with."""
RETRY_FAILED = "ran out of memory again after its retry"
"""What the error of a trial whose retry ran out of memory too says (trials.parquet counts its retry from it)."""
MEMORY_KEYS = ("oom_retries", "micro_batch_size", "accum_steps")
"""What every report of a trial says about its memory: 1 after an out-of-memory retry, else 0; the batch size and
accumulation steps its trained recipe uses (after a retry: the micro-batch ones). Columns of trials.parquet."""


class _NotRetried(Exception):
    """An out-of-memory error that a smaller batch of the trial's own recipe cannot help (its upstream's build)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _report_history(history: list[dict], memory: dict, reused: bool = True) -> None:
    """Replay a finished artifact's epochs (the same config was already trained by another trial or run)."""
    from ray import tune

    node = node_id()
    for m in history:
        tune.report(dict(m, reused=int(reused), **memory, **{NODE_KEY: node}))


def _attempt(spec: PipelineSpec, meta: dict, resume: dict | None, retry: dict | None, reported: list[int],
             fault: bool) -> None:
    """One attempt at the trial: replay its artifact if the store has it, else build its upstream and train it.

    Args:
        spec: The trial's pipeline (micro-batched after an out-of-memory retry).
        meta: The trial's context (see :func:`mlfd.tune.launch.trial_context`).
        resume: The checkpoint state to continue from (None: from the start).
        retry: The retry this attempt is (``RETRY_STATE`` of its checkpoints), None for a first attempt.
        reported: ``[n]``, the epochs of this trial reported so far (updated): a retry trains them again without
            reporting them, so that one report stays one epoch for the scheduler.
        fault: Arm the injected out-of-memory error (``MLFD_FAULT_OOM``) for this attempt's training.
    """
    from ray import tune

    from mlfd.engine import inject_out_of_memory, is_out_of_memory
    from mlfd.stages.common import Context, read_metrics
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore, save_torch

    stage, study = meta["stage"], meta.get("study")
    ctx = Context(spec=spec, store=ArtifactStore(meta["store"]), progress=False)
    trial = StageTrial(ctx, stage, study)
    recipe = trial.recipe()
    memory = {"oom_retries": int(retry is not None), "micro_batch_size": recipe.batch_size,
              "accum_steps": recipe.grad_accum}
    cost = trial_cost(ctx, stage, study, meta.get(LATENCY_KEY))  # the same at every epoch

    def report(epoch: int, metrics: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_torch(dict(state, **({RETRY_STATE: retry} if retry else {})), Path(d) / STATE_FILE)
            tune.report(dict(metrics, **memory, **cost, **{NODE_KEY: node_id()}),
                        checkpoint=tune.Checkpoint.from_directory(d))
        reported[0] = max(reported[0], epoch + 1)

    # The last epoch is reported only once the artifact (best weights, test metrics) is in the store: schedulers stop
    # a trial as soon as it reports its last epoch (ASHA at max_t), which would kill it before the artifact is saved.
    last_epoch = stage_epochs(spec, stage) - 1
    final: dict = {}

    def on_epoch(epoch: int, metrics: dict, get_state) -> None:
        if epoch < reported[0]:  # a retry trains again what the first attempt reported
            return
        if epoch >= last_epoch:
            final.update(epoch=epoch, metrics=dict(metrics), state=get_state())
        else:
            report(epoch, metrics, get_state())

    existing = trial.artifact()
    if existing is not None:
        # Built by another trial or run (replay its epochs), or by this trial before its final report was recorded
        # (replay the epochs after its checkpoint).
        _report_history(read_metrics(existing)["history"][reported[0]:], {**memory, **cost}, reused=resume is None)
        return
    try:
        trial.build_upstream()  # teachers, caches, T*: built once in the store, not reported
    except Exception as e:
        if is_out_of_memory(e):
            raise _NotRetried(e) from e
        raise
    ctx.on_epoch, ctx.resume = on_epoch, resume
    inject_out_of_memory(1 if fault else 0)
    try:
        trial.build()
    finally:
        inject_out_of_memory(0)
    if final:
        report(final["epoch"], final["metrics"], final["state"])


def run_stage(config: dict, context: dict) -> None:
    """The function trainable for every stage (``context['stage']`` says which).

    A trial with a fraction of a GPU caps its CUDA memory at its share (``context['gpu']``; :mod:`mlfd.tune.memory`).
    A trial that runs out of memory while it trains is retried once, in this process, with a micro-batch and
    gradient accumulation over the same effective batch (:func:`train_with_retry`); every report says so
    (:data:`MEMORY_KEYS`), and so do its checkpoints (:data:`RETRY_STATE`: a restored trial goes on with the
    micro-batch). A second out-of-memory error, or one while the trial's upstream is built, fails the trial with a
    one-line :class:`mlfd.engine.OutOfMemory`.
    """
    import torch
    from ray import tune

    from mlfd.engine import resolve_device
    from mlfd.store import load_torch
    from mlfd.tune.memory import apply_memory_cap

    spec = trial_spec(config, context)
    torch.set_num_threads(max(1, int(context.get("threads", 1))))
    apply_memory_cap(float(context.get("gpu", 0) or 0), resolve_device(spec.device))
    ckpt = tune.get_checkpoint()
    resume = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_torch(Path(d) / STATE_FILE)
    reported = [resume["epoch"] + 1 if resume is not None else 0]
    first = [resume]  # the checkpoint is the first attempt's to continue from; a retry starts afresh

    def attempt(attempt_spec: PipelineSpec, retry: dict | None, fault: bool) -> None:
        start, first[0] = first[0], None
        _attempt(attempt_spec, context, start, retry, reported, fault)

    train_with_retry(spec, context["stage"], context.get("study"), context["store"], attempt,
                     retry=(resume or {}).get(RETRY_STATE), faults=int(os.environ.get(OOM_FAULT_ENV, "0") or 0))


def train_with_retry(spec: PipelineSpec, stage: str, study: str | None, store: str,
                     attempt: Callable[[PipelineSpec, dict | None, bool], None], retry: dict | None = None,
                     faults: int = 0) -> dict | None:
    """Train a trial with one retry after running out of memory: the retry logic of :func:`run_stage`, on its own.

    Calls ``attempt(spec, None, fault)``; if that raises an out-of-memory error (torch's, or a failed host
    allocation), frees what it held (:func:`mlfd.tune.memory.free_memory`, outside the ``except`` block, so the
    traceback no longer holds the attempt's frames) and calls ``attempt(micro_spec, retry, fault)`` once, where
    ``micro_spec`` is ``spec`` with the trial's recipe micro-batched (:func:`mlfd.tune.memory.micro_batch`,
    :func:`mlfd.stages.trial.micro_batched`) and ``retry`` is ``{"micro_batch_size", "accum_steps", "error"}``.

    Args:
        spec: The trial's pipeline.
        stage: The searched stage.
        study: The study (the dataset of a students or teachers trial).
        store: The artifact store's path (to read the trial's recipe).
        attempt: Trains (or replays) the trial with a pipeline; ``retry`` is None on the first attempt; ``fault``
            asks it to arm the injected out-of-memory error (:func:`mlfd.engine.inject_out_of_memory`).
        retry: Start directly with this retry (a trial restored from a checkpoint of its retry).
        faults: How many attempts get ``fault=True`` (``MLFD_FAULT_OOM``).

    Returns:
        The retry that trained the trial, or None when the first attempt did.

    Raises:
        OutOfMemory: One line: the retry ran out of memory too, the upstream's build did (a smaller batch of the trial
            would not help), or the batch is too small to split.
    """
    from mlfd.engine import OutOfMemory, is_out_of_memory, out_of_memory
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial, micro_batched
    from mlfd.store import ArtifactStore
    from mlfd.tune.memory import free_memory, micro_batch

    what = f"{stage} trial {study or ''}".strip()
    attempt_spec = spec if retry is None else micro_batched(spec, stage, study, retry["micro_batch_size"],
                                                            retry["accum_steps"])
    for n in range(2):
        try:
            attempt(attempt_spec, retry, n < faults)
            return retry
        except _NotRetried as e:  # the upstream's build ran out of memory: a smaller trial batch would not help
            failure, split = out_of_memory(e.error, f"{what} (building its upstream)"), None
        except Exception as e:
            if not is_out_of_memory(e) or isinstance(e, OutOfMemory):  # mlfd's own OutOfMemory already says why
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
            if retry is not None:
                failure, split = OutOfMemory(
                    f"{what} {RETRY_FAILED} with micro-batch {retry['micro_batch_size']} x "
                    f"{retry['accum_steps']} accumulation steps ({first}); lower the batch size or give it more "
                    "memory (resources.gpu)"), None
            else:
                base = StageTrial(Context(spec=spec, store=ArtifactStore(store), progress=False), stage,
                                  study).recipe()
                failure, split = out_of_memory(e, what), micro_batch(base.batch_size, base.grad_accum)
                if split is None:
                    failure = OutOfMemory(f"{failure}; its batch of {base.batch_size} is too small to split")
        finally:
            free_memory()  # what the attempt held, once its traceback is gone (also when ASHA stops a trial)
        if split is None:
            raise failure from None
        retry = {"micro_batch_size": split.batch_size, "accum_steps": split.grad_accum, "error": first}
        attempt_spec = micro_batched(spec, stage, study, split.batch_size, split.grad_accum)
        _logger.warning("%s ran out of memory (%s); retrying once in the same trial: %s", what, first,
                        split.describe())
    return retry  # unreachable: the second attempt returned or raised


__all__ = ["LATENCY_KEY", "MEMORY_KEYS", "OOM_FAULT_ENV", "RETRY_FAILED", "RETRY_STATE", "run_stage", "stage_epochs",
           "train_with_retry", "trial_cost", "trial_spec"]
