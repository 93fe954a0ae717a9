"""The adapter contract: how one test-time adaptation method plugs into the server.

An adapter is a *method* with a validated *config*. The shared base model is frozen and
never changes; everything a stream adapts lives in a :class:`StreamState` (a flat
``dict[str, Tensor]`` plus small JSON metadata), which the server stores per stream and
passes back in on the next request. The four verbs:

``prepare(model)``
    One-time conversion at model load, independent of the per-stream config (for example
    swapping norm layers for layers that read statistics from per-stream tensors). The
    server caches one prepared model per (model, method).
``init_state(model, seed)``
    The tensors this method adapts and nothing else (never a whole-model copy).
``step(model, x, state, adapt=True)``
    Predict and (unless ``adapt`` is False) adapt. Per-stream tensors enter through
    :func:`torch.func.functional_call`; the shared model's parameters and buffers are
    bit-identical before and after any number of steps. Returns a new state; the input
    state is never mutated, so a failed step leaves the stream untouched.
``reset(model, state)``
    Back to source: the same as ``init_state`` with the stream's seed, keeping step count
    and version so the store's versioning stays monotonic.
``step_many(model, segments)``
    Many streams' batches at once (one :class:`Segment` per stream: its images, its state, its
    ``adapt`` flag); returns one :class:`StepResult` per segment, in order, each what ``step``
    would return for that segment alone (the same prediction and next state up to float
    rounding, the same metadata). Why: many streams that send one or two images each would
    otherwise cost one forward pass per stream. The default runs ``step`` per segment, so every
    method supports it; fused methods run one forward pass over the concatenated images with
    per-segment statistics (:mod:`adapters.segments`).

Unsupported (method, model) combinations are rejected by :meth:`Adapter.check_model`
when a stream is configured, never at the first request.

``adapt=False`` is a dry run: the prediction is the one ``adapt=True`` would return, the
returned state equals the input state (gradient methods skip their backward passes).

Optional hooks (defaults make them no-ops, so methods without them need nothing):

``auxiliary_models()`` / ``bind_auxiliary(models)``
    A method that needs more models than the stream's own (CEMA's teacher) names them by role
    in ``auxiliary_models()`` (role -> catalogue model name, from its config). The server loads
    each named model, passes it through *this method's* ``prepare`` (so the per-(model, method)
    cache applies), and calls ``bind_auxiliary({role: prepared_model})`` before
    ``check_model``/``init_state``. Auxiliary models are shared and frozen like the main model;
    whatever a method adapts in them is per-stream state. A missing or unusable auxiliary model
    raises :class:`AuxiliaryModelError` (a subclass of :class:`UnsupportedModelError`, HTTP 422).
``export_tensors(state)``
    ``(version, tensors)``: the adapted tensors under the model's own parameter/buffer names,
    ready for ``model.load_state_dict(tensors, strict=False)`` on an edge device that pulls
    them; ``version`` increases whenever they change. Empty for methods that adapt nothing
    loadable.

:class:`StepInfo` reports, besides counts, ``samples_filtered`` (samples a filter excluded
from the update) and in ``extra`` method-specific figures (SAR's reliable samples, AdaB²N's
eta, ``auto``'s regime). Prediction entropy and confidence are not among them: the server
scores every answered row once per batch (``serving/drift.py``), so an adapter computing them
again per step would only cost time (and a host sync per step on a GPU).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from adapters.errors import AuxiliaryModelError, InvalidConfigError, StateMismatchError, UnsupportedModelError
from adapters.norms import NormKind, detect_norm_kinds
from adapters.packed import PackedTensors
from adapters.validation import check_same_tensors, check_step, check_values


class MethodConfig(BaseModel):
    """Base of every method's config: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    legacy_values: ClassVar[dict[str, Any]] = {}
    """Fields added after runs were recorded, with the value those runs used (their records lack the
    field): how an old record is labelled once the field's default differs from that behaviour."""


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


@dataclass(frozen=True)
class StateMeta:
    """Small JSON-serializable facts about a state: which method/config/model made it, and where it is."""

    method: str
    config: dict[str, Any]
    model_hash: str
    seed: int = 0
    step: int = 0
    version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """Flatten to string metadata for a safetensors header."""
        return {
            "method": self.method,
            "config": json.dumps(self.config, sort_keys=True),
            "model_hash": self.model_hash,
            "seed": str(self.seed),
            "step": str(self.step),
            "version": str(self.version),
            "extra": json.dumps(self.extra, sort_keys=True),
        }

    @classmethod
    def from_strings(cls, raw: Mapping[str, str]) -> StateMeta:
        """Inverse of :meth:`to_strings`; raises KeyError/ValueError on malformed input."""
        return cls(
            method=raw["method"],
            config=json.loads(raw["config"]),
            model_hash=raw["model_hash"],
            seed=int(raw["seed"]),
            step=int(raw["step"]),
            version=int(raw["version"]),
            extra=json.loads(raw.get("extra", "{}")),
        )


@dataclass(frozen=True)
class StreamState:
    """Everything one stream has adapted: named tensors plus metadata."""

    tensors: Mapping[str, torch.Tensor]
    """A dict, or after a fused step a :class:`~adapters.packed.PackedTensors` (read-only, one buffer)."""
    meta: StateMeta

    def nbytes(self) -> int:
        """Bytes held by the tensors (what a stream costs in memory and in the store)."""
        if isinstance(self.tensors, PackedTensors):
            return self.tensors.nbytes()
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def with_meta(self, **changes: Any) -> StreamState:
        """A copy with some metadata fields replaced (tensors shared, not copied)."""
        # vars + a constructor call: ``dataclasses.replace`` walks the fields in Python, on every step
        return StreamState(self.tensors, StateMeta(**{**vars(self.meta), **changes}))


@dataclass(frozen=True)
class StepInfo:
    """What one step reports for metrics and drift monitoring.

    ``forwards``/``backwards`` count passes over the request batch and any extra batches the
    step ran (replay, teacher); ``samples_filtered`` counts samples a reliability or redundancy
    filter excluded from the update; ``extra`` holds ``entropy_mean`` and ``max_prob_mean``
    plus method-specific figures.
    """

    adapted: bool
    samples: int
    samples_used: int
    resets: int = 0
    forwards: int = 1
    backwards: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    samples_filtered: int = 0


@dataclass(frozen=True)
class StepResult:
    """Logits for the batch, the stream's next state, and step info."""

    logits: torch.Tensor
    state: StreamState
    info: StepInfo


@dataclass(frozen=True)
class Segment:
    """One stream's part of a fused call to :meth:`Adapter.step_many`.

    ``x`` holds that stream's preprocessed images (N_i, ...), ``state`` its current state and
    ``adapt`` whether this batch may change it (False: a dry run, as ``step(..., adapt=False)``).
    """

    x: torch.Tensor
    state: StreamState
    adapt: bool = True


class Adapter(ABC, Generic[ConfigT]):
    """One TTA method bound to a validated config. Subclasses set the class attributes."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    supported_norms: ClassVar[frozenset[NormKind]]
    predicts: ClassVar[Literal["before_update", "after_update", "no_update"]]
    batch_size_one: ClassVar[str]
    """How the method behaves with one image per request (shown in docs and /v1/methods)."""

    def __init__(self, config: ConfigT | Mapping[str, Any] | None = None) -> None:
        self.config: ConfigT = self.parse_config(config)

    @classmethod
    def parse_config(cls, config: MethodConfig | Mapping[str, Any] | None) -> ConfigT:
        """Validate a config dict (or pass a config object through) with clear errors."""
        if isinstance(config, cls.config_cls):
            return config  # type: ignore[return-value]
        try:
            return cls.config_cls.model_validate(dict(config or {}))  # type: ignore[return-value]
        except ValidationError as exc:
            raise InvalidConfigError(cls.name, exc) from exc

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if this method cannot adapt ``model``."""
        kinds = detect_norm_kinds(model)
        if not kinds & self.supported_norms:
            found = ", ".join(sorted(k.value for k in kinds)) or "no normalization layers"
            supported = ", ".join(sorted(k.value for k in self.supported_norms))
            raise UnsupportedModelError(f"method '{self.name}' adapts {supported} layers; the model has {found}")

    def prepare(self, model: nn.Module) -> nn.Module:
        """One-time conversion at model load. The default freezes the model in eval mode."""
        model.eval()
        model.requires_grad_(False)
        return model

    @abstractmethod
    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        """The source state of a new stream."""

    @abstractmethod
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        """Predict for ``x`` and, if ``adapt``, return the adapted next state."""

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """One result per segment, each what ``step`` returns for that segment alone.

        The default steps each segment in turn; methods whose layers can keep statistics per
        segment override it with one fused forward pass (the results must not change).
        """
        return [self.step(model, seg.x, seg.state, adapt=seg.adapt) for seg in segments]

    def reset(self, model: nn.Module, state: StreamState) -> StreamState:
        """Back to source, keeping step and version counters."""
        fresh = self.init_state(model, state.meta.seed, state.meta.model_hash)
        return StreamState(fresh.tensors, replace(state.meta, extra=fresh.meta.extra))

    nan_markers: ClassVar[frozenset[str]] = frozenset()
    """State tensors in which NaN means "no value yet" (accepted when a state is imported)."""

    def check_state(self, state: StreamState, reference: StreamState, sample_shape: tuple[int, ...]) -> None:
        """Raise :class:`StateMismatchError` unless ``state`` is one this method could have produced.

        ``reference`` is the stream's source state (``init_state``); ``sample_shape`` is one
        preprocessed input (C x H x W). The default wants exactly the reference's tensors, shapes
        and dtypes, finite bounded values (NaN only in :attr:`nan_markers`), a sane step and the
        reference's ``extra`` keys. Methods whose tensor set grows override it.
        """
        del sample_shape
        check_same_tensors(state.tensors, reference.tensors)
        check_values(state.tensors, self.nan_markers)
        self.check_meta(state.meta, reference.meta)

    def check_meta(self, meta: StateMeta, reference: StateMeta) -> None:
        """The metadata part of :meth:`check_state`: step bounds and the method's own ``extra`` fields."""
        check_step(meta.step)
        if not isinstance(meta.extra, dict) or set(meta.extra) != set(reference.extra):
            raise StateMismatchError(
                f"state metadata 'extra' must have the keys {sorted(reference.extra)}, got {meta.extra!r:.200}"
            )
        for key, value in meta.extra.items():
            if type(value) is not type(reference.extra[key]):
                raise StateMismatchError(f"state metadata 'extra.{key}' must be {type(reference.extra[key]).__name__}")

    def auxiliary_models(self) -> dict[str, str]:
        """Role -> catalogue model name of the extra models this method needs (none by default)."""
        return {}

    def bind_auxiliary(self, models: Mapping[str, nn.Module]) -> None:
        """Receive the prepared auxiliary models named by :meth:`auxiliary_models`, keyed by role."""
        unexpected = set(models) - set(self.auxiliary_models())
        if unexpected:
            raise AuxiliaryModelError(f"method '{self.name}' takes no auxiliary models {sorted(unexpected)}")

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, adapted tensors under the model's own names) for an edge device; empty by default."""
        return state.meta.step, {}

    def new_meta(self, seed: int, model_hash: str, **extra: Any) -> StateMeta:
        """Metadata for a fresh state of this adapter."""
        return StateMeta(self.name, self.config.model_dump(mode="json"), model_hash, seed, extra=dict(extra))
