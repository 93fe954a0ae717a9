"""``auto``: per stream, pick among existing normalization mechanics from unlabelled signals only.

Why: every fixed method fails somewhere (docs/results-notes.md). Batch statistics (BN adapt,
α-BN) are best on class-balanced batches of many images and collapse on batches of one or two
classes or single images; UnMix-TNS components survive class-imbalanced and single-image streams
but warm up slowly on balanced ones; on GN/LN models no measured method beats the source model
by more than a point, and entropy minimization collapses under label correlation. The user does
not know in advance which stream they have, so ``auto`` decides per batch, online.

Norms: every model. BN layers get the regimes below. GN and LN layers normalize each sample
with its own statistics, so there is no batch statistic to calibrate, and the only mechanics
left are the gradient methods (Tent, SAR). Measured on the project's GN and LN models
(docs/results.md): Tent collapses under label correlation (89% error against 32-35% for the
source model) and loses 20-26 points at B = 1; SAR is within 1 point of the source model at
B = 1 (0.1 and 0.9 better) but 0.3 and 2.4 points worse in ``correlated``, with twice the
forwards and two backwards per batch. No unlabelled signal measured here tells those streams
apart early enough, so on a model without BN layers ``auto`` keeps the source regime: its
predictions are the source model's, its state counts the steps, and the response says
``regime: source``. A model with BN and other norms adapts its BN layers only.

Regimes (``StepInfo.extra["regime"]`` carries the number; :data:`REGIME_NAMES` the name):

- ``0 source``: the frozen source model, while adaptation looks harmful (below).
- ``1 batch_mix``: α-BN, the source statistics mixed with this batch's
  (``batch_source_weight``, default 0.6: the α-BN weight tuned on seed 1 for i.i.d. batches).
  Chosen when the batch has at least ``min_batch`` images and looks class-balanced: the
  component-normalized predictions of the batch spread over at least ``diversity_min`` · C
  effective classes (exp of the entropy of the batch's mean prediction) and their mean
  prediction is within ``imbalance_max`` (total variation) of the stream's running mean
  prediction. Both signals come from the components' forward, whose normalization does not
  depend on the other images of the batch, so a single-class batch cannot hide itself.
- ``2 components``: UnMix-TNS (K components per BN layer, per-sample mixing), with a momentum of
  ``component_momentum`` per call whatever the batch size (B_max = B): 0.1 per image at B = 1,
  which is the setting tuned for single images, and 0.1 per batch of 64, the official default
  that survives class-correlated streams. Chosen for small or class-imbalanced batches.

The components are updated on *every* adapting batch, whatever the regime, so a stream that
changes from batches of 64 to single images finds them warm.

Harm check (the fallback to ``source``): every step also runs the source model. An EMA
(``ema``) of the adapted prediction's mean entropy minus the source's tracks whether
adaptation makes the model less sure than not adapting; above ``harm_margin`` · ln C the
stream predicts with the source model until the EMA falls below half of it (hysteresis). The
disagreement with the source is reported (``extra["disagreement"]``) but not used: under a
strong shift a good adaptation legitimately disagrees with the source on most images.

- Prediction: in the call that computes this batch's component update; the components' forward
  normalizes with the pre-update components mixed with each sample's own statistics, as
  ``unmix_tns``. The state changes only if ``adapt``; a dry run gives the same prediction.
- Cost per batch: 2 forwards (components + source), 3 in the ``batch_mix`` regime. State: the
  components (2·K·C per BN layer), the stream's running mean prediction (C) and a float64 vector
  of signals (:data:`SIGNALS`).
- Deterministic: the components start from ``init`` (default ``"source_spread"``: fixed
  balanced directions, no random draw), so the stream's seed does not change the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from adapters.alpha_bn import AlphaBatchNorm
from adapters.base import Adapter, MethodConfig, StepInfo, StepResult, StreamState
from adapters.errors import StateMismatchError
from adapters.functional import Tensors, cloned, entropy, forward, on_device, per_layer, qualified
from adapters.layers import check_source_statistics, swap_batchnorms
from adapters.norms import NormKind
from adapters.registry import register
from adapters.unmix_tns import (
    HYPER,
    MEANS,
    VARS,
    UnMixBatchNorm,
    init_components,
    source_components,
    spread_components,
)
from adapters.validation import check_same_tensors, check_values

SIGNALS = "auto_signals"
"""State tensor of the regime logic: see :class:`AutoSignals` for the fields, in order."""

REGIME_SOURCE, REGIME_BATCH_MIX, REGIME_COMPONENTS = 0, 1, 2
REGIME_NAMES: dict[int, str] = {REGIME_SOURCE: "source", REGIME_BATCH_MIX: "batch_mix", REGIME_COMPONENTS: "components"}
"""Regime number (``StepInfo.extra["regime"]``) -> the name the server shows."""


def regime_name(value: float | None) -> str | None:
    """The name of a regime number from ``StepInfo.extra`` (None when absent or unknown)."""
    if value is None or not math.isfinite(value):
        return None
    return REGIME_NAMES.get(round(value))


class AutoBatchNorm(UnMixBatchNorm, AlphaBatchNorm):  # type: ignore[misc]  # segmented_forward: see below
    """A BN layer that runs either UnMix-TNS (components given) or α-BN / the source (no components).

    One prepared model serves every regime: which mechanics a call uses is decided by the
    per-call tensors, as in the other methods' layers. ``auto`` steps segments one by one (the
    base ``step_many``), so the per-segment paths of the two parents, whose ``segmented_forward``
    signatures differ, are never entered.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.unmix_means is not None:
            return UnMixBatchNorm.forward(self, input)
        return AlphaBatchNorm.forward(self, input)


class AutoConfig(MethodConfig):
    """Thresholds of the regime logic and the settings of the mechanics it chooses from."""

    batch_source_weight: float = Field(0.6, ge=0.0, le=1.0, description="α-BN source weight in the batch_mix regime")
    min_batch: int = Field(16, ge=2, le=65536, description="fewest images for the batch_mix regime")
    diversity_min: float = Field(
        0.5, ge=0.0, le=1.0, description="effective classes of a batch, as a fraction of C, for batch_mix"
    )
    imbalance_max: float = Field(
        0.35, ge=0.0, le=1.0, description="largest TV distance of the batch's mean prediction from the stream's"
    )
    num_components: int = Field(16, ge=1, le=512, description="UnMix-TNS components per BN layer")
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="UnMix-TNS assignment temperature")
    alpha_init: float = Field(0.5, ge=0.0, lt=1.0, description="share of source variance spread between components")
    component_momentum: float = Field(0.1, gt=0.0, le=1.0, description="component momentum per call, any B")
    init: Literal["random", "source_spread", "source"] = "source_spread"
    harm_margin: float = Field(
        0.25, ge=0.0, le=1.0, description="fall back to source when adapted entropy exceeds source's by this·ln C"
    )
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="EMA factor of the harm and class-balance signals")


@dataclass(frozen=True)
class AutoSignals:
    """The regime logic's memory (stored as one float64 vector, in field order)."""

    regime: int = REGIME_SOURCE
    harmful: bool = False
    gap_ema: float = 0.0
    switches: int = 0
    batches: int = 0

    def to_tensor(self) -> torch.Tensor:
        values = [self.regime, float(self.harmful), self.gap_ema, self.switches, self.batches]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> AutoSignals:
        v = t.detach().cpu().double().tolist()
        return cls(regime=round(v[0]), harmful=v[1] > 0.5, gap_ema=v[2], switches=round(v[3]), batches=round(v[4]))


NUM_SIGNALS = 5

_RUNNING = "auto_running_prediction"
"""State tensor (BN models): the stream's EMA of the mean prediction of the components' forward."""

_OWN = frozenset({SIGNALS, _RUNNING})
"""State tensors of the regime logic (the others are UnMix-TNS components, passed to the layers)."""


def num_outputs(model: nn.Module) -> int | None:
    """Classes of a classifier whose last linear layer is its head (None if it has no linear layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def batch_diversity(probs: torch.Tensor) -> float:
    """Effective number of classes of a batch, exp(H(mean prediction)), as a fraction of C."""
    mean = probs.float().mean(dim=0)
    h = float(-(mean * mean.clamp_min(1e-12).log()).sum())
    return math.exp(h) / probs.shape[1]


def wanted_regime(batch_size: int, diversity: float, imbalance: float, cfg: AutoConfig) -> int:
    """The adaptive regime a batch asks for: batch statistics only for large, class-balanced batches."""
    if batch_size >= cfg.min_batch and diversity >= cfg.diversity_min and imbalance <= cfg.imbalance_max:
        return REGIME_BATCH_MIX
    return REGIME_COMPONENTS


def next_signals(previous: AutoSignals, wanted: int, gap: float, num_classes: int, cfg: AutoConfig) -> AutoSignals:
    """Update the harm EMA and pick this batch's regime (``wanted`` unless adaptation looks harmful).

    ``gap`` is the adapted prediction's mean entropy minus the source's (nats). The fallback
    starts when the EMA exceeds ``harm_margin``·ln C and ends below half of that (hysteresis, so
    a stream does not flap between regimes on noise).
    """
    gap_ema = gap if previous.batches == 0 else cfg.ema * previous.gap_ema + (1 - cfg.ema) * gap
    limit = cfg.harm_margin * math.log(max(num_classes, 2))
    harmful = gap_ema > limit or (previous.harmful and gap_ema > 0.5 * limit)
    regime = REGIME_SOURCE if harmful else wanted
    switched = previous.batches > 0 and regime != previous.regime
    return AutoSignals(regime, harmful, gap_ema, previous.switches + int(switched), previous.batches + 1)


@register
class Auto(Adapter[AutoConfig]):
    """Choose and blend source, α-BN and UnMix-TNS mechanics per stream from unlabelled signals."""

    name = "auto"
    config_cls = AutoConfig
    supported_norms = frozenset(NormKind)
    predicts = "after_update"
    batch_size_one = "works: UnMix-TNS components with momentum 0.1 per image"

    def check_model(self, model: nn.Module) -> None:
        """Any normalized model; BN layers must have source statistics (GN/LN models keep the source regime)."""
        super().check_model(model)
        check_source_statistics(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for :class:`AutoBatchNorm` (input model untouched)."""
        return swap_batchnorms(model, AutoBatchNorm)

    @staticmethod
    def _layers(model: nn.Module) -> list[tuple[str, AutoBatchNorm]]:
        """The swapped BN layers, in model order."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, AutoBatchNorm)]

    def _component_layers(self, model: nn.Module) -> list[tuple[str, AutoBatchNorm]]:
        """Swapped layers with components: all but former BatchNorm1d (no instance statistics)."""
        return [(name, m) for name, m in self._layers(model) if not m.replaces_1d]

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        """Components for every BN2d layer (BN1d keeps the source), a uniform running prediction, fresh signals."""
        cfg = self.config
        generator = torch.Generator(device="cpu").manual_seed(seed)
        tensors: Tensors = {}
        for name, layer in self._component_layers(model):
            mean, var = layer.source_stats()
            if cfg.init == "source_spread":
                means, variances = spread_components(mean, var, cfg.num_components, cfg.alpha_init)
            elif cfg.init == "source":
                means, variances = source_components(mean, var, cfg.num_components)
            else:
                means, variances = init_components(mean, var, cfg.num_components, cfg.alpha_init, generator)
            tensors[qualified(name, MEANS)] = means
            tensors[qualified(name, VARS)] = variances
        classes = num_outputs(model)
        if tensors and classes:
            tensors[_RUNNING] = torch.full((classes,), 1.0 / classes, dtype=torch.float64)
        tensors[SIGNALS] = AutoSignals().to_tensor()
        return StreamState(tensors, self.new_meta(seed, model_hash))

    def check_state(self, state: StreamState, reference: StreamState, sample_shape: tuple[int, ...]) -> None:
        """The reference's tensors and shapes, finite values, and a regime number that exists."""
        del sample_shape
        check_same_tensors(state.tensors, reference.tensors)
        check_values(state.tensors)
        signals = state.tensors[SIGNALS]
        if signals.numel() != NUM_SIGNALS or round(float(signals[0])) not in REGIME_NAMES:
            raise StateMismatchError(f"state tensor '{SIGNALS}' holds no valid regime")
        self.check_meta(state.meta, reference.meta)

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        previous = AutoSignals.from_tensor(state.tensors[SIGNALS])
        source_logits = forward(model, {}, x)
        layers = self._component_layers(model)
        if not layers or len(x) == 0:  # nothing to adapt (GN/LN or BN1d layers only) or nothing to see
            signals = next_signals(previous, REGIME_SOURCE, 0.0, source_logits.shape[1], self.config)
            return self._result(source_logits, state, {}, signals, adapt, forwards=1, extra={})
        cfg = self.config
        components = cloned(on_device({k: v for k, v in state.tensors.items() if k not in _OWN}, x.device))
        hyper = torch.tensor([cfg.temperature, cfg.component_momentum, float(len(x))], device=x.device)
        call = {**components, **{qualified(name, HYPER): hyper for name, _ in layers}}
        unmix_logits = forward(model, call, x)
        unmix_probs = F.softmax(unmix_logits.float(), dim=1)
        num_classes = unmix_logits.shape[1]
        diversity = batch_diversity(unmix_probs)
        imbalance = 0.5 * float((unmix_probs.mean(0) - self._running_mean(state, num_classes)).abs().sum())
        wanted = wanted_regime(len(x), diversity, imbalance, cfg)
        forwards = 2
        adapted = unmix_logits
        if wanted == REGIME_BATCH_MIX:
            adapted = forward(model, self._mix_call(model, x.device), x)
            forwards = 3
        gap = float(entropy(adapted.float()).mean() - entropy(source_logits.float()).mean())
        signals = next_signals(previous, wanted, gap, num_classes, cfg)
        logits = source_logits if signals.regime == REGIME_SOURCE else adapted
        disagreement = float((logits.argmax(1) != source_logits.argmax(1)).float().mean())
        if _RUNNING in state.tensors:
            running = self._running_mean(state, num_classes)
            rate = 1.0 if previous.batches == 0 else 1 - cfg.ema
            components[_RUNNING] = running + rate * (unmix_probs.mean(0).double().cpu() - running)
        extra = {"diversity": diversity, "imbalance": imbalance, "disagreement": disagreement}
        return self._result(logits, state, components, signals, adapt, forwards=forwards, extra=extra)

    def _mix_call(self, model: nn.Module, device: torch.device) -> Tensors:
        """Per-call tensors of the batch_mix regime: α-BN's source weight and variance flag on every layer."""
        names = [name for name, _ in self._layers(model)]
        weight = torch.tensor(self.config.batch_source_weight, device=device)
        unbiased = torch.tensor(1.0, device=device)
        return {**per_layer(names, "source_weight", weight), **per_layer(names, "unbiased", unbiased)}

    @staticmethod
    def _running_mean(state: StreamState, num_classes: int) -> torch.Tensor:
        """The stream's running mean prediction (uniform before the first batch)."""
        running = state.tensors.get(_RUNNING)
        if running is None or running.numel() != num_classes:
            return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        return running.detach().cpu().double()

    def _result(
        self,
        logits: torch.Tensor,
        state: StreamState,
        components: Tensors,
        signals: AutoSignals,
        adapt: bool,
        forwards: int,
        extra: dict[str, float],
    ) -> StepResult:
        samples = len(logits)
        previous = AutoSignals.from_tensor(state.tensors[SIGNALS])
        info_extra = {
            **extra,
            "regime": float(signals.regime),
            "switched": float(signals.switches != previous.switches),
            "entropy_gap": signals.gap_ema,
        }
        adapts = bool(components)
        info = StepInfo(
            adapted=adapt and adapts,
            samples=samples,
            samples_used=samples if adapt and adapts else 0,
            forwards=forwards,
            extra=info_extra,
        )
        if not adapt:
            return StepResult(logits, state, info)
        tensors = {**state.tensors, **{k: v.to(state.tensors[k].device) for k, v in components.items()}}
        tensors[SIGNALS] = signals.to_tensor()
        return StepResult(logits, StreamState(tensors, state.meta).with_meta(step=state.meta.step + 1), info)
