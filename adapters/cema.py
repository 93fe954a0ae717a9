"""``cema``: Cloud-Edge Elastic Model Adaptation (Chen, Niu et al., ICLR 2024).

Two models per stream: the *edge* model (the stream's model, what the client runs) and a larger
*teacher* (the "foundation model" in the cloud). In one ``step``:

1. Edge (request path): the edge model forward only, with the stream's distilled edge norm affine
   parameters and BN statistics; this is the returned prediction (made *before* any update).
2. Sample selection on the edge's predictions: unreliable samples (entropy ≥ E_max_t) and
   low-informative ones (entropy ≤ E_min, and EATA's redundancy filter |cos(p, m)| ≥ d_margin)
   are excluded; the rest are "uploaded". The paper's dynamic threshold
   E_max_t = E_max·(avg entropy now / avg entropy at warm-up)·λ is a switch.
3. Cloud: uploads queue until ``cloud_batch_size`` are pending; per full batch the teacher adapts
   by weighted entropy minimization, then the edge norm affine parameters are distilled from the
   teacher on the batch plus replayed history with α·L_ent + β·L_KL + γ·L_CE. When no cloud batch
   was complete and the history holds more than ``replay_start`` samples, one replay-only
   distillation step runs (the reference's behaviour; ``replay_only_steps=False`` turns it off).

Contract details:

- Teacher: ``config.teacher`` names a catalogue model; the server resolves it through
  :meth:`auxiliary_models` and hands the model, passed through *this method's* ``prepare``,
  to :meth:`bind_auxiliary` (role ``"teacher"``). With ``teacher=None`` the edge model is its own
  teacher (a separate per-stream copy of its adapted tensors): no second model needed, useful for
  tests and small deployments, but not the paper's setting. The teacher's adapted affine
  parameters, SGD momentum and BN statistics are per-stream state (``teacher/...``).
- Upload and replay buffers live in the state as uint8-quantized inputs (:mod:`adapters.replay`):
  the step receives the preprocessed float batch, which is quantized per sample and channel
  (error below half a grey level of the original image). Memory per stored sample:
  numel bytes + 8 bytes per channel; the default 10 000-sample history is ≈30 MB per stream for
  32×32 images. Chunks keep ``step`` from copying the whole history on every call.
- Edge parameters carry a version (``edge/version``, +1 per distillation step, +1 on reset) and
  :meth:`export_tensors` returns them (norm affine + BN running statistics) under the model's own
  names, so an edge device can ``load_state_dict(strict=False)`` them when the version changes.
- BN statistics start from the source (the reference re-initializes them from the first test
  batch, which at B = 1 would be instance statistics). Cloud forwards use test-time batch
  renormalization (TBR): the forward value uses the running statistics, the gradient flows
  through the batch statistics, and the running statistics move with ``tbr_momentum``.
- Prediction: ``before_update``. Batch size 1: works; filtering is per sample and the cloud
  accumulates uploads until a cloud batch is full. Norms: BN (TBR), GN, LN (affine only).
- Thresholds are fractions of ln C. Randomness (replay sampling) comes from a generator seeded by
  (stream seed, step), so runs are reproducible.
- ``prepare`` returns a copy with BN layers swapped for :class:`TBRBatchNorm`.
- Deviations from the released code (which does not import as shipped): statistics from the
  source (above); defaults follow the paper (dynamic threshold on, E_min = 0.02·ln C, λ = 1.0)
  while the shipped config disables both; the warm-up length is unverified (1000 samples);
  the edge always predicts with the latest distilled parameters (sync period K = 1, the
  reference default) and the ``iters < 10`` warm-up copy is not reproduced; EATA's redundancy
  margin ``d_margin`` = 0.05 is an ImageNet (C = 1000) value that filters nearly every sample at
  C = 10, because cosines between probability vectors grow with 1/√C (cos(one-hot, uniform) =
  1/√C). The default ``"auto"`` therefore scales it as 0.05·√(1000/C): the reference value
  at C = 1000, 0.5 at C = 10 (the CIFAR-10 benchmarks set 0.4 explicitly). A number fixes
  it; None switches the redundancy filter off.
- ``adapt=False``: the edge forward only; nothing is filtered, uploaded or adapted.
- ``step_many``: the edge forward (the prediction) is one fused pass over every segment, with
  each stream's edge affine and BN statistics stacked (S, C) and gathered per sample. The
  filtering, the uploads and the cloud part (teacher adaptation, distillation, replay) run per
  stream after it, exactly as in ``step``: they depend on each stream's pending and replay
  buffers, and the teacher passes run over buffered images, not over the request batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapters import replay
from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.errors import AuxiliaryModelError, StateMismatchError
from adapters.functional import (
    Tensors,
    bn_statistics,
    cloned,
    entropy,
    entropy_margin,
    forward,
    grads_of,
    model_device,
    norm_affine,
    on_device,
    per_layer,
    prefixed,
    requiring_grad,
    sgd_step,
    unprefixed,
    var_mean,
    zeros_like_all,
)
from adapters.layers import (
    StreamBatchNorm,
    check_source_statistics,
    fused_with_segment_affine,
    prepared_layers,
    segment_layers,
    swap_affine_norms,
    swap_batchnorms,
)
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, segment_names, stacked
from adapters.validation import check_fifo_buffer, check_same_tensors, check_values

TEACHER_ROLE = "teacher"
EDGE = "edge/"
TEACHER = "teacher/"
AFFINE = "affine/"
MOMENTUM = "momentum/"
STATS = "stats/"
VERSION = "edge/version"
ENT_SUM = "filter/entropy_sum"
ENT_COUNT = "filter/entropy_count"
ENT_REF = "filter/entropy_at_warmup"
PROB_EMA = "filter/prob_ema"
PENDING = "pending/"
HISTORY = "replay/"


class TBRBatchNorm(StreamBatchNorm):
    """Test-time batch renormalization (DELTA), reading the stream's running statistics.

    Per-call tensors: the stream's ``running_mean``/``running_var`` (substituted for the source
    ones; updated in place in TBR mode, so the caller passes clones) and ``tbr_momentum``
    (scalar; present -> TBR training forward, absent -> eval with the running statistics).
    A fused call is eval only: each segment's running statistics come stacked as
    ``segment_mean``/``segment_var`` (S, C).
    """

    tbr_momentum: torch.Tensor | None

    def __init__(self, source: _BatchNorm) -> None:
        super().__init__(source)
        self.register_buffer("tbr_momentum", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.segment_index is not None:
            if self.tbr_momentum is not None:
                raise NotImplementedError("TBR training forwards run per stream, not fused")
            return self.normalize_segments(input, *self.reference_stats(len(self.layout()[1])))
        if self.tbr_momentum is None or input.numel() // input.shape[1] < 2:
            return self.source_forward(input)
        run_mean, run_var = self.source_stats()
        var_b, mean_b = var_mean(input, self.batch_dims(input), correction=1)
        std_b = torch.sqrt(var_b + self.eps)
        std_run = torch.sqrt(run_var + self.eps)
        r = (std_b / std_run).detach()
        d = ((mean_b - run_mean) / std_run).detach()
        shape = [1, -1] + [1] * (input.dim() - 2)
        x_hat = (input - mean_b.reshape(shape)) / std_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
        with torch.no_grad():
            run_mean.add_(self.tbr_momentum * (mean_b.detach() - run_mean))
            run_var.add_(self.tbr_momentum * (var_b.detach() - run_var))
        if not self.affine:
            return x_hat
        return x_hat * self.weight.reshape(shape) + self.bias.reshape(shape)


def dynamic_threshold(e_max: float, avg_now: float, avg_at_warmup: float, coeff: float) -> float:
    """The paper's E_max_t = E_max·(avg entropy now / avg entropy at warm-up)·λ."""
    return e_max * (avg_now / avg_at_warmup) * coeff


REFERENCE_D_MARGIN = 0.05
"""EATA's redundancy margin, chosen for ImageNet (C = 1000)."""


def redundancy_margin(d_margin: float | Literal["auto"] | None, num_classes: int) -> float | None:
    """The cosine margin of the redundancy filter for a C-class model (None = filter off)."""
    if d_margin == "auto":
        return min(1.0, REFERENCE_D_MARGIN * math.sqrt(1000 / num_classes))
    return d_margin


def select_samples(
    ent: torch.Tensor,
    probs: torch.Tensor,
    e_max: float,
    e_min: float | None,
    prob_ema: torch.Tensor | None,
    d_margin: float | None,
) -> torch.Tensor:
    """Boolean mask of the samples to upload: reliable, informative and not redundant."""
    keep = ent < e_max
    if e_min is not None:
        keep &= ent > e_min
    if d_margin is not None and prob_ema is not None:
        cos = F.cosine_similarity(prob_ema[None].to(probs.dtype), probs, dim=1)
        keep &= cos.abs() < d_margin
    return keep


def update_prob_ema(prob_ema: torch.Tensor | None, kept_probs: torch.Tensor) -> torch.Tensor | None:
    """EATA's moving average of the kept samples' mean softmax (0.9 / 0.1); unset until a sample is kept."""
    if kept_probs.shape[0] == 0:
        return prob_ema
    mean = kept_probs.mean(dim=0)
    return mean if prob_ema is None else 0.9 * prob_ema + 0.1 * mean


def weighted_entropy(logits: torch.Tensor, e_max: float) -> torch.Tensor:
    """EATA/CEMA's mean of H(x)·exp(E_max − H(x)) with the weight detached (confident samples count more)."""
    ent = entropy(logits)
    return (ent * torch.exp(e_max - ent.detach())).mean()


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    e_max: float,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """α·L_ent + β·L_KL + γ·L_CE, each sample weighted by exp(E_max − H(teacher)) (detached).

    L_ent = mean H(s)·exp(E_max − H(s)) (weight detached); L_KL = mean w·T²·KL(softmax(t/T) ‖
    softmax(s/T)); L_CE = mean w·CE(s, argmax t).
    """
    teacher = teacher.detach()
    w = torch.exp(e_max - entropy(teacher))
    l_ent = weighted_entropy(student, e_max)
    log_pt = F.log_softmax(teacher / temperature, dim=1)
    log_ps = F.log_softmax(student / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    l_kl = (w * temperature**2 * kl).mean()
    l_ce = (w * F.cross_entropy(student, teacher.argmax(dim=1), reduction="none")).mean()
    loss = alpha * l_ent + beta * l_kl + gamma * l_ce
    parts = {"loss_ent": float(l_ent.detach()), "loss_kl": float(l_kl.detach()), "loss_ce": float(l_ce.detach())}
    return loss, parts


class CEMAConfig(MethodConfig):
    """``conf/cema.conf`` values, with the paper's switches (dynamic E_max, E_min) on by default."""

    teacher: str | None = Field(
        None, min_length=1, max_length=200, description="catalogue model name of the teacher; None = the edge model"
    )
    ent_high_margin: float = Field(0.4, gt=0.0, le=1.0, description="E_max = ent_high_margin * ln C")
    dynamic_threshold: bool = True
    ent_high_margin_coeff: float = Field(1.0, gt=0.0, le=10.0, description="λ of the dynamic threshold")
    warm_up_samples: int = Field(1000, ge=1, le=10**9, description="samples before the reference entropy freezes")
    ent_low_margin: float | None = Field(0.02, ge=0.0, le=1.0, description="E_min = ent_low_margin * ln C; None=off")
    d_margin: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] | None = Field(
        "auto", description="redundancy cosine margin; 'auto' = 0.05*sqrt(1000/C) (0.5 at C = 10); None = off"
    )
    cloud_batch_size: int = Field(32, ge=1, le=4096)
    replay: bool = True
    replay_buffer_size: int = Field(10_000, ge=0, le=100_000, description="history capacity (samples, FIFO)")
    replay_start: int = Field(256, ge=0, le=100_000, description="history size before replay mixing starts")
    replay_ratio: int = Field(3, ge=0, le=16, description="replayed samples per new sample in a cloud step")
    replay_only_steps: bool = True
    alpha: float = Field(3.0, ge=0.0, le=100.0, description="weight of the student's entropy loss")
    beta: float = Field(3.0, ge=0.0, le=100.0, description="weight of the KL distillation loss")
    gamma: float = Field(1.0, ge=0.0, le=100.0, description="weight of the CE distillation loss")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    teacher_lr: float = Field(2.5e-4, ge=0.0, le=1.0)
    edge_lr: float = Field(2.5e-3, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    tbr_momentum: float = Field(0.1, ge=0.0, le=1.0)


@register
class CEMA(Adapter[CEMAConfig]):
    """Edge predicts; the cloud filters uploads, adapts a teacher and distills the edge's norm affine."""

    name = "cema"
    config_cls = CEMAConfig
    supported_norms = frozenset(NormKind)
    predicts = "before_update"
    batch_size_one = "works: per-sample filtering; the cloud accumulates uploads to cloud_batch_size"

    def __init__(self, config: CEMAConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._teacher: nn.Module | None = None

    nan_markers = frozenset({ENT_REF})

    # -- contract hooks -------------------------------------------------------------------------

    def check_state(self, state: StreamState, reference: StreamState, sample_shape: tuple[int, ...]) -> None:
        """Fixed tensors as the source state's; the buffers and the kept-probability EMA, which appear and grow,
        checked by form.

        The pending uploads never reach ``cloud_batch_size`` after a step (a full batch is consumed);
        the replay history holds at most ``replay_buffer_size`` samples.
        """
        buffers = (PENDING, HISTORY)
        fixed = {k: v for k, v in state.tensors.items() if not k.startswith(buffers) and k != PROB_EMA}
        check_same_tensors(fixed, reference.tensors)
        prob_ema = state.tensors.get(PROB_EMA)  # absent until the first samples were kept
        if prob_ema is not None and (
            prob_ema.dim() != 1
            or not prob_ema.is_floating_point()
            or not bool(((prob_ema >= 0) & (prob_ema <= 1)).all())
        ):
            raise StateMismatchError(f"tensor '{PROB_EMA}' must be a vector of probabilities")
        check_values(fixed, self.nan_markers)
        check_fifo_buffer(state.tensors, PENDING, self.config.cloud_batch_size, sample_shape)
        check_fifo_buffer(state.tensors, HISTORY, self.config.replay_buffer_size, sample_shape)
        buffer_values = {k: v for k, v in state.tensors.items() if k.startswith(buffers)}
        check_values(buffer_values)
        self.check_meta(state.meta, reference.meta)

    def auxiliary_models(self) -> dict[str, str]:
        """``{"teacher": name}`` when a teacher is configured; none when the edge teaches itself."""
        return {TEACHER_ROLE: self.config.teacher} if self.config.teacher is not None else {}

    def bind_auxiliary(self, models: Mapping[str, nn.Module]) -> None:
        """Take the prepared teacher; it must be a model this method prepared, with supported norms."""
        super().bind_auxiliary(models)
        if TEACHER_ROLE in models:
            teacher = models[TEACHER_ROLE]
            try:
                prepared_layers(teacher, TBRBatchNorm)
                super().check_model(teacher)
                check_source_statistics(teacher)
            except (RuntimeError, ValueError) as exc:
                raise AuxiliaryModelError(f"teacher model for 'cema' is unusable: {exc}") from exc
            self._teacher = teacher

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        check_source_statistics(model)
        if self.config.teacher is not None and self._teacher is None:
            raise AuxiliaryModelError(f"method 'cema' needs its teacher '{self.config.teacher}' bound first")

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for :class:`TBRBatchNorm`, GN/LN for segment-aware twins."""
        return swap_affine_norms(swap_batchnorms(model, TBRBatchNorm))

    def teacher_model(self, model: nn.Module) -> nn.Module:
        """The bound teacher, or the edge model itself when no teacher is configured."""
        if self.config.teacher is None:
            return model
        if self._teacher is None:
            raise AuxiliaryModelError(f"method 'cema' needs its teacher '{self.config.teacher}' bound first")
        return self._teacher

    # -- state ----------------------------------------------------------------------------------

    @staticmethod
    def _model_state(model: nn.Module, prefix: str) -> Tensors:
        affine = norm_affine(model)
        return {
            **prefixed(prefix + AFFINE, affine),
            **prefixed(prefix + MOMENTUM, zeros_like_all(affine)),
            **prefixed(prefix + STATS, bn_statistics(model)),
        }

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        """Edge and teacher tensors from the source (affine, zero momentum, BN statistics), empty buffers."""
        prepared_layers(model, TBRBatchNorm)
        device = model_device(model)
        tensors = {
            **self._model_state(model, EDGE),
            **self._model_state(self.teacher_model(model), TEACHER),
            VERSION: torch.zeros((), dtype=torch.int64, device=device),
            ENT_SUM: torch.zeros((), dtype=torch.float64, device=device),
            ENT_COUNT: torch.zeros((), dtype=torch.int64, device=device),
            ENT_REF: torch.tensor(math.nan, dtype=torch.float64, device=device),
        }
        return StreamState(tensors, self.new_meta(seed, model_hash))

    def reset(self, model: nn.Module, state: StreamState) -> StreamState:
        """Back to source (teacher, edge, filters and buffers), with the edge version still increasing."""
        fresh = super().reset(model, state)
        version = int(state.tensors[VERSION]) + 1 if VERSION in state.tensors else 0
        tensors = dict(fresh.tensors)
        tensors[VERSION] = torch.tensor(version, dtype=torch.int64, device=tensors[VERSION].device)
        return StreamState(tensors, fresh.meta)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """(edge version, edge norm affine + BN running statistics) under the edge model's names."""
        tensors = {**unprefixed(EDGE + AFFINE, state.tensors), **unprefixed(EDGE + STATS, state.tensors)}
        return int(state.tensors[VERSION]), tensors

    # -- step -----------------------------------------------------------------------------------

    @staticmethod
    def _tensors_of(tensors: Tensors, prefix: str) -> tuple[Tensors, Tensors]:
        """(affine, stats) of one model from the state; stats cloned (TBR updates them in place)."""
        return unprefixed(prefix + AFFINE, tensors), cloned(unprefixed(prefix + STATS, tensors))

    def _tbr_flags(self, model: nn.Module) -> Tensors:
        """Per-call tensors that put every BN layer of ``model`` in TBR training mode."""
        flag = torch.tensor(self.config.tbr_momentum, device=model_device(model))
        return per_layer(prepared_layers(model, TBRBatchNorm), "tbr_momentum", flag)

    def _teacher_update(self, teacher: nn.Module, tensors: Tensors, x: torch.Tensor, e_max: float) -> Tensors:
        """Weighted entropy minimization of the teacher's norm affine on one cloud batch (TBR mode)."""
        affine, stats = self._tensors_of(tensors, TEACHER)
        live = requiring_grad(affine)
        loss = weighted_entropy(forward(teacher, {**stats, **self._tbr_flags(teacher), **live}, x), e_max)
        grads = grads_of(loss, live)
        new_affine, new_mom = sgd_step(
            affine, grads, unprefixed(TEACHER + MOMENTUM, tensors), self.config.teacher_lr, self.config.momentum
        )
        new = dict(tensors)
        new.update(prefixed(TEACHER + AFFINE, new_affine))
        new.update(prefixed(TEACHER + MOMENTUM, new_mom))
        new.update(prefixed(TEACHER + STATS, stats))
        return new

    def _distill(
        self, model: nn.Module, teacher: nn.Module, tensors: Tensors, x: torch.Tensor, e_max: float
    ) -> tuple[Tensors, dict[str, float]]:
        """One distillation step of the edge's norm affine towards the (eval-mode) teacher."""
        cfg = self.config
        t_affine, t_stats = self._tensors_of(tensors, TEACHER)
        with torch.no_grad():
            t_logits = forward(teacher, {**t_stats, **t_affine}, x)
        affine, stats = self._tensors_of(tensors, EDGE)
        live = requiring_grad(affine)
        s_logits = forward(model, {**stats, **self._tbr_flags(model), **live}, x)
        if s_logits.shape != t_logits.shape:
            raise AuxiliaryModelError(
                f"teacher outputs {tuple(t_logits.shape[1:])} but the edge model {tuple(s_logits.shape[1:])}"
            )
        loss, parts = distillation_loss(s_logits, t_logits, e_max, cfg.alpha, cfg.beta, cfg.gamma, cfg.temperature)
        grads = grads_of(loss, live)
        new_affine, new_mom = sgd_step(affine, grads, unprefixed(EDGE + MOMENTUM, tensors), cfg.edge_lr, cfg.momentum)
        new = dict(tensors)
        new.update(prefixed(EDGE + AFFINE, new_affine))
        new.update(prefixed(EDGE + MOMENTUM, new_mom))
        new.update(prefixed(EDGE + STATS, stats))
        new[VERSION] = tensors[VERSION] + 1
        return new, parts

    def _sample_history(
        self, tensors: Tensors, count: int, generator: torch.Generator, like: torch.Tensor
    ) -> torch.Tensor:
        """``count`` distinct random history samples, dequantized to ``like``'s device and dtype."""
        available = replay.size(tensors, HISTORY)
        indices = torch.randperm(available, generator=generator)[: min(count, available)]
        codes, scale, offset = replay.take(tensors, HISTORY, indices)
        return replay.dequantize(codes, scale, offset, like.dtype).to(like.device)

    def _select(self, tensors: Tensors, logits: torch.Tensor) -> tuple[torch.Tensor, Tensors, float]:
        """Edge-side filtering: (upload mask, updated filter tensors, threshold E_max_t used)."""
        cfg = self.config
        num_classes = logits.shape[1]
        e_max = entropy_margin(cfg.ent_high_margin, num_classes)
        with torch.no_grad():
            ent = entropy(logits.float())
            probs = F.softmax(logits.float(), dim=1)
        ent_sum = float(tensors[ENT_SUM]) + float(ent.sum())
        ent_count = int(tensors[ENT_COUNT]) + len(logits)
        avg_now = ent_sum / max(ent_count, 1)
        ent_ref = float(tensors[ENT_REF])
        if cfg.dynamic_threshold and math.isnan(ent_ref) and ent_count >= cfg.warm_up_samples:
            ent_ref = avg_now
        threshold = e_max
        if cfg.dynamic_threshold and not math.isnan(ent_ref) and ent_ref > 0:
            threshold = dynamic_threshold(e_max, avg_now, ent_ref, cfg.ent_high_margin_coeff)
        e_min = entropy_margin(cfg.ent_low_margin, num_classes) if cfg.ent_low_margin is not None else None
        prob_ema = tensors.get(PROB_EMA)
        d_margin = redundancy_margin(cfg.d_margin, num_classes)
        keep = select_samples(ent, probs, threshold, e_min, prob_ema, d_margin)
        device = logits.device
        updated = {
            ENT_SUM: torch.tensor(ent_sum, dtype=torch.float64, device=device),
            ENT_COUNT: torch.tensor(ent_count, dtype=torch.int64, device=device),
            ENT_REF: torch.tensor(ent_ref, dtype=torch.float64, device=device),
        }
        new_ema = update_prob_ema(prob_ema, probs[keep])
        if new_ema is not None:
            updated[PROB_EMA] = new_ema
        return keep, updated, threshold

    def _cloud(
        self, model: nn.Module, tensors: Tensors, like: torch.Tensor, num_classes: int, seed: int, step: int
    ) -> tuple[Tensors, dict[str, float]]:
        """Cloud side: teacher adaptation + distillation per full pending batch, else one replay-only step."""
        cfg = self.config
        teacher = self.teacher_model(model)
        e_max = entropy_margin(cfg.ent_high_margin, num_classes)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**62)
        counts = {"cloud_steps": 0.0, "replay_steps": 0.0, "forwards": 0.0, "backwards": 0.0}
        parts: dict[str, float] = {}
        new = tensors
        while replay.size(new, PENDING) >= cfg.cloud_batch_size:
            new, (codes, scale, offset) = replay.pop_front(new, PENDING, cfg.cloud_batch_size)
            batch = replay.dequantize(codes, scale, offset, like.dtype).to(like.device)
            new = self._teacher_update(teacher, new, batch, e_max)
            if cfg.replay and cfg.replay_ratio > 0 and replay.size(new, HISTORY) >= cfg.replay_start:
                batch = torch.cat([batch, self._sample_history(new, cfg.replay_ratio * len(batch), generator, like)])
            new, parts = self._distill(model, teacher, new, batch, e_max)
            counts["cloud_steps"] += 1
            counts["forwards"] += 3
            counts["backwards"] += 2
        history = replay.size(new, HISTORY)
        if not counts["cloud_steps"] and cfg.replay and cfg.replay_only_steps and history > max(cfg.replay_start, 1):
            batch = self._sample_history(new, (cfg.replay_ratio + 1) * cfg.cloud_batch_size, generator, like)
            new, parts = self._distill(model, teacher, new, batch, e_max)
            counts["replay_steps"] += 1
            counts["forwards"] += 2
            counts["backwards"] += 1
        return new, {**counts, **parts}

    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        tensors = on_device(state.tensors, x.device)
        # 1. edge forward (request path): the prediction
        affine, stats = self._tensors_of(tensors, EDGE)
        with torch.no_grad():
            logits = forward(model, {**stats, **affine}, x)
        return self._after_edge(model, x, state, tensors, logits, adapt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """The edge forwards of all segments fused into one pass; selection and cloud per stream."""
        return fused_with_segment_affine(self, model, segments, self._fused, EDGE + AFFINE)

    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        batch = FusedBatch.of([seg.x for seg in segments])
        tensors = [on_device(seg.state.tensors, batch.x.device) for seg in segments]
        edge = stacked([{**unprefixed(EDGE + AFFINE, t), **unprefixed(EDGE + STATS, t)} for t in tensors])
        call = {**segment_names(edge), **batch.per_layer(segment_layers(model))}
        with torch.no_grad():
            logits = batch.split(forward(model, call, batch.x))
        return [
            self._after_edge(model, seg.x, seg.state, t, out, seg.adapt)
            for seg, t, out in zip(segments, tensors, logits, strict=True)
        ]

    def _after_edge(
        self, model: nn.Module, x: torch.Tensor, state: StreamState, tensors: Tensors, logits: torch.Tensor, adapt: bool
    ) -> StepResult:
        """Everything after the edge forward: selection, uploads, cloud, and the result."""
        samples = len(x)
        extra: dict[str, float] = {}
        if not adapt:
            return StepResult(logits, state, StepInfo(False, samples, 0, extra=extra))

        # 2. sample selection, 3. upload to the pending cloud batch and the replay history
        keep, filters, threshold = self._select(tensors, logits)
        new = {**tensors, **filters}
        uploads = int(keep.sum())
        if uploads:
            codes, scale, offset = replay.quantize(x[keep])
            new = replay.append(new, PENDING, codes, scale, offset, capacity=2**62)
            if self.config.replay:
                new = replay.append(new, HISTORY, codes, scale, offset, capacity=self.config.replay_buffer_size)

        # 4. cloud: teacher adaptation and edge distillation
        new, cloud = self._cloud(model, new, x, logits.shape[1], state.meta.seed, state.meta.step)
        forwards = 1 + int(cloud.pop("forwards"))
        backwards = int(cloud.pop("backwards"))
        extra.update(cloud)
        extra.update(
            {
                "threshold": threshold,
                "uploads": float(uploads),
                "edge_version": float(int(new[VERSION])),
                "pending": float(replay.size(new, PENDING)),
                "history": float(replay.size(new, HISTORY)),
            }
        )
        info = StepInfo(
            True,
            samples,
            uploads,
            forwards=forwards,
            backwards=backwards,
            samples_filtered=samples - uploads,
            extra=extra,
        )
        return StepResult(logits, StreamState(new, state.meta).with_meta(step=state.meta.step + 1), info)
