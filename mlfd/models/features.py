"""timm classifiers that also return their features at MLFD levels 1..4.

Levels (paper section 3, ``design.md`` section 1):

- level 1: the pooled pre-logits vector ``[B, F]``, the classifier's input (read with a hook on
  ``get_classifier()`` during the one ``forward_head`` call that gives the logits, so with a timm ``drop_rate`` > 0
  in train mode it is the dropped-out vector the logits come from; ``forward_head(x, pre_logits=True)`` for a model
  without such a classifier);
- level 2: the last feature map ``[B, C, H, W]``, i.e. the map the head pools (the model's final features; for
  EfficientNet-like models this includes the head conv, as in the authors' code: 1280 channels for B0);
- level 3: the output of the stage before the last one;
- level 4: the output of the stage before that.

Stages are timm's ``feature_info`` entries. Features come from ``forward_intermediates`` when the model has it and
from forward hooks on the ``feature_info`` modules otherwise. Token maps (ViT) and NHWC maps (Swin, MambaOut) are
returned as NCHW maps; shapes are read from the model with one dry forward, never hard-coded.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Optional

import timm
import torch
from torch import nn

from mlfd.config import MAX_LEVEL, ModelSpec, register_check
from mlfd.errors import SpecError

__all__ = ["LevelModel", "check_arch", "create_model", "load_checkpoint"]

Method = Literal["auto", "intermediates", "hooks"]

# Key prefixes added by DDP, torch.compile and our own wrappers (LevelModel.model, Student.backbone); a checkpoint
# saved through any of them should still load into the bare timm model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.")


def check_arch(arch: str, path: str) -> None:
    """Raise :class:`SpecError` unless timm knows the model name ``arch``.

    Args:
        arch: A timm model name, optionally with a pretrained tag (``resnet18.a1_in1k``).
        path: Dotted spec path used in the error message.

    Raises:
        SpecError: ``"<path>: unknown timm model 'x'; see timm.list_models() (close matches: ...)"``.
    """
    if isinstance(arch, str) and arch and timm.is_model(arch):
        return
    close = difflib.get_close_matches(str(arch), timm.list_models(), n=5, cutoff=0.6)
    hint = f" (close matches: {', '.join(close)})" if close else ""
    raise SpecError(f"{path}: unknown timm model {arch!r}; see timm.list_models(){hint}")


register_check("arch", check_arch)  # config validates ModelSpec.arch through this once mlfd.models is loaded


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _strip_prefixes(state: dict[str, Any], model_keys: set[str]) -> dict[str, Any]:
    changed = True
    while changed and state and not (set(state) & model_keys):
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
                break
    return state


def load_checkpoint(model: nn.Module, file: str | Path, path: str = "model.checkpoint") -> None:
    """Load a state dict saved with ``torch.save`` into ``model`` (safely, ``weights_only=True``).

    Accepts a raw state dict or a mapping with a ``"state_dict"`` or ``"model"`` entry; strips the key prefixes of
    DDP (``module.``), ``torch.compile`` (``_orig_mod.``) and our wrappers (``model.``, ``backbone.``).

    Args:
        model: The freshly created timm model.
        file: Checkpoint file.
        path: Dotted spec path used in error messages.

    Raises:
        SpecError: The file is missing or unreadable, or its weights do not fit the model.
    """
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found: {file}") from None
    except Exception as e:  # pickle/zip errors differ between torch versions; all mean "not a usable checkpoint"
        raise SpecError(f"{path}: cannot load {file} with torch.load(weights_only=True): {_one_line(e)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SpecError(f"{path}: {file} is not a state dict (nor a mapping with 'state_dict' or 'model')")
    state = _strip_prefixes(dict(obj), set(model.state_dict()))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if v]
        detail = "; ".join(parts) if parts else _one_line(e)
        arch = _arch_name(model)
        raise SpecError(f"{path}: {file} does not fit model '{arch}': {detail}") from None


def create_model(spec: ModelSpec, num_classes: int, path: str = "model") -> nn.Module:
    """Create the timm classifier a :class:`ModelSpec` describes, with ``num_classes`` outputs.

    Args:
        spec: Architecture, pretrained flag, optional checkpoint and extra ``timm.create_model`` kwargs.
        num_classes: Size of the classifier (the dataset's class count).
        path: Dotted spec path of ``spec``, used in error messages.

    Returns:
        The timm model (randomly initialised unless ``spec.pretrained`` or ``spec.checkpoint``).

    Raises:
        SpecError: Unknown architecture, kwargs timm rejects, or a checkpoint that does not fit.
    """
    check_arch(spec.arch, f"{path}.arch")
    if "num_classes" in spec.kwargs:
        raise SpecError(f"{path}.kwargs.num_classes: set from the dataset's classes; remove it")
    try:
        model = timm.create_model(spec.arch, pretrained=spec.pretrained, num_classes=num_classes, **spec.kwargs)
    except TypeError as e:  # an unknown keyword for this architecture's constructor
        raise SpecError(f"{path}.kwargs: timm.create_model({spec.arch!r}) rejected them: {_one_line(e)}") from None
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint, f"{path}.checkpoint")
    return model


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _first_tensor(out: Any) -> torch.Tensor:
    # Some blocks return (x, attn) or lists; the feature is the first tensor.
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


class LevelModel(nn.Module):
    """A timm classifier that also returns its features at levels 1..max_level.

    ``forward(x)`` with no levels is exactly ``model(x)``; asking for levels adds no extra backbone pass.

    Attributes:
        model: The wrapped timm model (what gets deployed; its ``state_dict`` is the checkpoint).
        input_size: Square input resolution the level shapes refer to.
        arch: timm architecture name, for messages.
        method: ``"intermediates"`` (timm ``forward_intermediates``) or ``"hooks"`` (forward hooks on the
            ``feature_info`` modules) once resolved; only level 1 is offered when neither is possible.
    """

    def __init__(self, model: nn.Module, input_size: int, method: Method = "auto"):
        """Wrap ``model``.

        Args:
            model: A timm classifier (anything with ``forward_features`` and ``forward_head``).
            input_size: Square input resolution used to measure level shapes.
            method: How maps are read: ``"auto"`` (``forward_intermediates`` if the model has it, else hooks),
                or force ``"intermediates"`` / ``"hooks"`` (tests use this to check one against the other).
        """
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise TypeError(f"{type(model).__name__} is not a timm classifier (needs forward_features/forward_head)")
        self.model = model
        self.input_size = int(input_size)
        self.arch = _arch_name(model)
        infos = list(getattr(model, "feature_info", None) or [])
        self._stage_modules = [str(f.get("module", "")) for f in infos]
        self._stage_chs = [int(f.get("num_chs", -1)) for f in infos]
        if method == "auto":
            method = "intermediates" if hasattr(model, "forward_intermediates") else "hooks"
        if method == "intermediates" and not hasattr(model, "forward_intermediates"):
            raise ValueError(f"model '{self.arch}' has no forward_intermediates")
        self.method: str = method
        if method == "intermediates":
            params = inspect.signature(model.forward_intermediates).parameters
            self._fi_kwargs = {k: v for k, v in (("output_fmt", "NCHW"), ("norm", False)) if k in params}
            self._fi_stop_early = "stop_early" in params
        n_stages = len(infos)
        if method == "hooks" and not all(self._stage_modules):
            n_stages = 0  # no module names to hook: level 1 only
        self._max_level = 1 + min(MAX_LEVEL - 1, n_stages)
        self._shapes: Optional[dict[int, tuple[int, ...]]] = None

    # ------------------------------------------------------------------------------------------------------------
    # Shapes and validation
    # ------------------------------------------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        """How many levels (1..num_levels) this model offers at ``input_size``: 1 + number of stages, capped at 4."""
        return len(self._measure())

    def level_shapes(self, levels: Iterable[int] | None = None) -> dict[int, tuple[int, ...]]:
        """Per-sample feature shapes: ``(F,)`` for level 1, ``(C, H, W)`` for maps.

        Measured once with a dry forward of one image at ``input_size`` (eval mode, no grad; every submodule's
        train/eval flag is restored afterwards) and cached.

        Args:
            levels: Levels to report; None means all offered levels.

        Raises:
            SpecError: A requested level is not offered.
        """
        shapes = self._measure()
        if levels is None:
            return dict(shapes)
        levels = list(levels)
        self.check_levels(levels, "levels")
        return {lvl: shapes[lvl] for lvl in levels}

    def check_levels(self, levels: Iterable[int], path: str) -> None:
        """Raise :class:`SpecError` unless every level is one this model offers.

        Args:
            levels: Levels to check.
            path: Dotted spec path used in the error message.
        """
        n = self._max_level if self._shapes is None else len(self._shapes)
        for lvl in levels:
            if isinstance(lvl, bool) or not isinstance(lvl, int) or not 1 <= lvl <= n:
                raise SpecError(f"{path}: model '{self.arch}' has levels 1..{n} at input size {self.input_size}; "
                                f"got {lvl!r}")

    def _measure(self) -> dict[int, tuple[int, ...]]:
        if self._shapes is not None:
            return self._shapes
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros(1, 3, self.input_size, self.input_size, device=device, dtype=dtype)
        # Eval mode: BatchNorm must neither fail on a 1x1 map of one sample nor update its running statistics.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        all_levels = tuple(range(1, self._max_level + 1))
        try:
            with torch.no_grad():
                try:
                    _, feats = self._features(x, all_levels)
                except Exception:
                    # Some families' forward_intermediates reject our arguments; hooks need only module names.
                    if self.method != "intermediates" or self._max_level == 1 or not all(self._stage_modules):
                        raise
                    self.method = "hooks"
                    _, feats = self._features(x, all_levels)
        except Exception as e:
            raise SpecError(f"model '{self.arch}' cannot run at input size {self.input_size}: {_one_line(e)}") from e
        finally:
            for m, training in modes:
                m.training = training
        self._shapes = {lvl: tuple(f.shape[1:]) for lvl, f in sorted(feats.items())}
        return self._shapes

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, levels: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits and the features at ``levels``.

        Args:
            x: Images ``[B, 3, H, W]``.
            levels: Levels to return; empty means logits only (exactly ``model(x)``, same cost).

        Returns:
            ``(logits [B, K], {level: features})`` with ``[B, F]`` for level 1 and NCHW maps for levels >= 2.
        """
        levels = tuple(levels)
        if not levels:
            return self.model(x), {}
        self.check_levels(levels, "levels")
        return self._features(x, levels, logits=True)

    def forward_level(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Only the features at one level (no logits); stops after the needed stage when the model allows it.

        Args:
            x: Images ``[B, 3, H, W]``.
            level: The level to return.

        Returns:
            ``[B, F]`` for level 1, an NCHW map otherwise.
        """
        self.check_levels([level], "level")
        return self._features(x, (level,), logits=False)[1][level]

    def _features(self, x: torch.Tensor, levels: tuple[int, ...],
                  logits: bool = False) -> tuple[Optional[torch.Tensor], dict[int, torch.Tensor]]:
        want = set(levels)
        deepest = max(want)
        out: dict[int, torch.Tensor] = {}
        # A single stage map below the last one needs no final features, so the pass can stop at that stage.
        if not logits and want == {deepest} and deepest >= 3:
            out[deepest] = self._stages(x, [deepest], stop_early=True)[0][deepest]
            return None, out
        if deepest >= 2:
            stage_levels = sorted(lvl for lvl in want if lvl >= 3)
            maps, final = self._stages(x, [2] + stage_levels, stop_early=False)
            out.update({lvl: maps[lvl] for lvl in want if lvl >= 3})
            if 2 in want:
                out[2] = self._final_map(final, maps[2])
        else:
            final = self.model.forward_features(x)
        if 1 not in want:
            return (self.model.forward_head(final) if logits else None), out
        head = self._head(final)
        if head is not None:
            out[1], head_logits = head
            return (head_logits if logits else None), out
        out[1] = self.model.forward_head(final, pre_logits=True)
        return (self.model.forward_head(final) if logits else None), out

    def _head(self, final: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Level 1 and the logits from one ``forward_head`` call: the classifier's input ``[B, F]`` and its output.

        One call means one head-dropout mask: the level-1 features are exactly the (dropped-out, in train mode)
        vector the logits are computed from. None when the model has no ``get_classifier()`` module or the
        classifier does not see one ``[B, F]`` input (then the caller reads level 1 with ``pre_logits=True``).
        """
        get_classifier = getattr(self.model, "get_classifier", None)
        classifier = get_classifier() if callable(get_classifier) else None
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            return None
        seen: list[torch.Tensor] = []
        handle = classifier.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
        try:
            logits = self.model.forward_head(final)
        finally:
            handle.remove()
        if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].ndim != 2:
            return None
        return seen[0], logits

    def _stages(self, x: torch.Tensor, levels: list[int],
                stop_early: bool) -> tuple[dict[int, torch.Tensor], Optional[torch.Tensor]]:
        """NCHW outputs of the stages for map ``levels`` (level c -> stage index -(c - 1)), and the final features.

        With ``stop_early`` the final features are not computed (returned as None).
        """
        indices = [-(lvl - 1) for lvl in levels]
        if self.method == "intermediates":
            kwargs = dict(self._fi_kwargs)
            if stop_early and self._fi_stop_early:
                kwargs["stop_early"] = True
            if stop_early:
                inter = self.model.forward_intermediates(x, indices=indices, intermediates_only=True, **kwargs)
                final = None
            else:
                final, inter = self.model.forward_intermediates(x, indices=indices, intermediates_only=False, **kwargs)
            # timm returns intermediates in stage order, whatever the order of the requested indices.
            order = sorted(levels, reverse=True)
            maps = {lvl: self._to_nchw(t, self._stage_chs[-(lvl - 1)] if self._stage_chs else -1)
                    for lvl, t in zip(order, inter)}
            return maps, final
        return self._stages_by_hooks(x, levels)

    def _stages_by_hooks(self, x: torch.Tensor,
                         levels: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def make_hook(lvl: int):
            def hook(_module: nn.Module, _inp: Any, output: Any) -> None:
                captured[lvl] = _first_tensor(output)
            return hook

        try:
            for lvl in levels:
                module = self.model.get_submodule(self._stage_modules[-(lvl - 1)])
                handles.append(module.register_forward_hook(make_hook(lvl)))
            # The whole forward_features runs (hooks cannot stop it); the caller needs the final features anyway.
            final = self.model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        maps = {lvl: self._to_nchw(captured[lvl], self._stage_chs[-(lvl - 1)]) for lvl in levels}
        return maps, final

    def _to_nchw(self, t: torch.Tensor, num_chs: int) -> torch.Tensor:
        """Bring a stage output (NCHW, NHWC, or tokens [B, N, C] with prefix tokens) to an NCHW map."""
        if t.ndim == 3:
            b, n, c = t.shape
            prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
            side = math.isqrt(n - prefix)
            if side * side != n - prefix:
                # Inputs are square, so a non-square token count means unknown prefix tokens: infer them.
                side = math.isqrt(n)
                prefix = n - side * side
            return t[:, prefix:].transpose(1, 2).reshape(b, c, side, side)
        if t.ndim == 4 and num_chs > 0 and t.shape[1] != num_chs and t.shape[-1] == num_chs:
            return t.permute(0, 3, 1, 2).contiguous()
        return t

    def _final_map(self, final: Any, last_stage: torch.Tensor) -> torch.Tensor:
        """The final features as an NCHW map with the last stage's spatial size, else the last stage's map.

        The final features are what the head pools (e.g. EfficientNet's head conv output, Swin's normed map, ViT's
        normed patch tokens); the last stage's NCHW map tells their layout.
        """
        h, w = last_stage.shape[-2:]
        if not isinstance(final, torch.Tensor):  # multi-branch models (CrossViT, CoaT) hand the head a list
            return last_stage
        if final.ndim == 4:
            nchw = tuple(final.shape[-2:]) == (h, w)
            nhwc = tuple(final.shape[1:3]) == (h, w)
            if nchw and nhwc:  # C == W and H == W: only the model can say
                nchw = getattr(self.model, "output_fmt", "NCHW") != "NHWC"
            if nchw:
                return final
            if nhwc:
                return final.permute(0, 3, 1, 2).contiguous()
        elif final.ndim == 3 and final.shape[1] >= h * w:
            b, n, c = final.shape
            return final[:, n - h * w:].transpose(1, 2).reshape(b, c, h, w)
        # Final features that are not a map of the last stage's size (already pooled, strided head): the stage map.
        return last_stage

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, input_size={self.input_size}, method={self.method!r}"
