"""``step_many``: several streams in one call give what each stream gets from ``step`` alone.

Every registered method and every norm type it supports (the cases come from the registry via
the adapter contract tests, so a new method is covered automatically). Streams have different
data, different states reached by a few earlier steps, different batch sizes (1 included) and
some dry runs; a stream of constant images must not disturb the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from adapters.base import Adapter, Segment, StepResult, StreamState
from adapters.norms import NormKind
from adapters.registry import create_adapter
from tests.contract.test_adapter_contract import CASES, TEST_CONFIGS, batches, build, snapshot, tiny_model

torch.set_num_threads(1)

TOL = 1e-5
SIZES = (3, 1, 4, 1)
ADAPT = (True, True, False, True)
ONE_FORWARD = {"source", "bn", "alpha_bn", "unmix_tns", "adab2n", "tent"}
"""Methods whose whole fused call is a single forward pass of the model (with the test configs)."""


def warmed_state(
    adapter: Adapter[Any], model: nn.Module, seed: int, steps: int = 3, device: str = "cpu"
) -> StreamState:
    """A stream's state after a few steps of its own data (batch sizes 2, 1, 3, ...)."""
    state = adapter.init_state(model, seed=seed)
    for i, x in enumerate(batches(steps, size=3, seed=100 + seed)):
        state = adapter.step(model, x[: 1 + (i + 1) % 3].to(device), state).state
    return state


def make_segments(adapter: Adapter[Any], model: nn.Module, device: str = "cpu") -> list[Segment]:
    """Four streams: different data, states and batch sizes, the third one a dry run."""
    segments = []
    for i, (size, adapt) in enumerate(zip(SIZES, ADAPT, strict=True)):
        x = batches(1, size=size, seed=200 + i)[0] * (1 + 0.3 * i)
        state = warmed_state(adapter, model, seed=i, steps=2 + i % 2, device=device)
        segments.append(Segment(x.to(device), state, adapt))
    return segments


def assert_same_result(alone: StepResult, fused: StepResult) -> None:
    """Same top-1, probabilities and next state within TOL, identical metadata and counts."""
    assert alone.logits.shape == fused.logits.shape
    assert torch.equal(alone.logits.argmax(1), fused.logits.argmax(1))
    torch.testing.assert_close(fused.logits.softmax(1), alone.logits.softmax(1), rtol=0, atol=TOL)
    assert not fused.logits.requires_grad
    assert fused.state.meta == alone.state.meta
    assert set(fused.state.tensors) == set(alone.state.tensors)
    for key, value in alone.state.tensors.items():
        other = fused.state.tensors[key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        torch.testing.assert_close(other, value, rtol=TOL, atol=TOL, equal_nan=True, msg=key)
    a, f = alone.info, fused.info
    counts = ("adapted", "samples", "samples_used", "resets", "forwards", "backwards", "samples_filtered")
    assert [getattr(f, c) for c in counts] == [getattr(a, c) for c in counts]
    assert set(f.extra) == set(a.extra)
    for key, figure in a.extra.items():
        assert f.extra[key] == pytest.approx(figure, rel=1e-4, abs=1e-5), key


def alone(adapter: Adapter[Any], model: nn.Module, segments: list[Segment]) -> list[StepResult]:
    return [adapter.step(model, seg.x, seg.state, adapt=seg.adapt) for seg in segments]


def assert_rounds_match_alone(
    adapter: Adapter[Any], model: nn.Module, segments: list[Segment], rounds: int, seed: int
) -> None:
    """``rounds`` fused calls in a row, each giving every stream what it gets alone; every round after
    the first continues from the fused round's states with new images of the same sizes and device."""
    for round_ in range(rounds):
        expected = alone(adapter, model, segments)
        fused = adapter.step_many(model, segments)
        assert len(fused) == len(segments)
        for seg, want, got in zip(segments, expected, fused, strict=True):
            assert got.logits.device == seg.x.device
            assert_same_result(want, got)
        segments = [
            Segment(batches(1, size=s.x.shape[0], seed=seed + round_ + i)[0].to(s.x.device), r.state, s.adapt)
            for i, (s, r) in enumerate(zip(segments, fused, strict=True))
        ]


@contextmanager
def counted_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Counts calls of the model's top-level forward (test-only hook, removed afterwards)."""
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_step_many_matches_each_stream_alone(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    assert_rounds_match_alone(adapter, model, make_segments(adapter, model), rounds=2, seed=300)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_fused_rounds_continue_from_fused_states(name: str, norm: NormKind) -> None:
    """Every stream adapting, three fused rounds in a row: states a fused step returned (packed in
    one buffer where the method packs them) feed the next fused step exactly like plain states."""
    adapter, model, _ = build(name, norm)
    segments = [Segment(s.x, s.state, True) for s in make_segments(adapter, model)]
    assert_rounds_match_alone(adapter, model, segments, rounds=3, seed=400)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_one_image_streams_fuse_exactly(name: str, norm: NormKind) -> None:
    """Many streams of one image each (the service's common shape: as many segments as samples):
    adapting and dry-run streams alike get what each gets alone, round after round."""
    adapter, model, _ = build(name, norm)
    segments = [
        Segment(batches(1, size=1, seed=600 + i)[0] * (1 + 0.2 * i), warmed_state(adapter, model, seed=i), i % 3 != 2)
        for i in range(5)
    ]
    assert_rounds_match_alone(adapter, model, segments, rounds=2, seed=700)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_constant_stream_changes_nothing_of_the_others(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    segments = make_segments(adapter, model)
    expected = alone(adapter, model, segments)
    constant = [
        Segment(torch.full((2, 3, 8, 8), 0.7), warmed_state(adapter, model, seed=7)),
        Segment(torch.zeros(1, 3, 8, 8), warmed_state(adapter, model, seed=8)),
    ]
    fused = adapter.step_many(model, [constant[0], *segments[:2], constant[1], *segments[2:]])
    others = fused[1:3] + fused[4:]
    for want, got in zip(expected, others, strict=True):
        assert_same_result(want, got)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_shared_model_and_input_states_are_untouched(name: str, norm: NormKind) -> None:
    adapter, model, base = build(name, norm)
    segments = make_segments(adapter, model)
    frozen = [{k: v.clone() for k, v in seg.state.tensors.items()} for seg in segments]
    metas = [seg.state.meta for seg in segments]
    before, base_before = snapshot(model), snapshot(base)
    adapter.step_many(model, segments)
    after = snapshot(model)
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    for key, value in snapshot(base).items():
        assert torch.equal(base_before[key], value), key
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    for seg, tensors, meta in zip(segments, frozen, metas, strict=True):
        assert seg.state.meta == meta
        assert set(seg.state.tensors) == set(tensors)
        for key, value in tensors.items():  # bit for bit (NaN marks an unset EMA)
            torch.testing.assert_close(seg.state.tensors[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize(("name", "norm"), [c for c in CASES if c.values[0] in ONE_FORWARD])
def test_fused_methods_run_one_forward(name: str, norm: NormKind) -> None:
    """Guards against a silent fallback to one step per stream."""
    adapter, model, _ = build(name, norm)
    segments = make_segments(adapter, model)
    with counted_forwards(model) as calls:
        adapter.step_many(model, segments)
    assert calls[0] == 1


@pytest.mark.parametrize(("name", "norm"), [c for c in CASES if c.values[0] in {"unmix_tns", "tent"}])
def test_mismatched_shapes_and_empty_calls_fall_back(name: str, norm: NormKind) -> None:
    """Segments whose images cannot be concatenated are stepped on their own, with the same results."""
    adapter, model, _ = build(name, norm)
    segments = make_segments(adapter, model)
    odd = Segment(torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1)), segments[0].state)
    mixed = [segments[0], odd, segments[1], segments[3]]
    for want, got in zip(alone(adapter, model, mixed), adapter.step_many(model, mixed), strict=True):
        assert_same_result(want, got)
    assert adapter.step_many(model, []) == []


TENT_OPTIONS = [
    pytest.param({"optimizer": "sgd", "lr": 0.01}, NormKind.BN, id="sgd-bn"),
    pytest.param({"optimizer": "sgd", "lr": 0.01}, NormKind.GN, id="sgd-gn"),
    pytest.param({"steps": 3, "lr": 0.01}, NormKind.BN, id="three-steps-bn"),
    pytest.param({"steps": 3, "lr": 0.01}, NormKind.GN, id="three-steps-gn"),
    # GN only: at batch size 1 the BN TinyNet's logits depend on its last BN bias alone (instance
    # statistics right before the pooling), so every other gradient is rounding noise, which the
    # first Adam step of a fresh (episodic) state turns into +-lr whatever the summation order.
    pytest.param({"episodic": True, "lr": 0.01}, NormKind.GN, id="episodic-gn"),
]


@pytest.mark.parametrize(("config", "norm"), TENT_OPTIONS)
def test_tent_options_fuse_exactly(config: dict[str, Any], norm: NormKind) -> None:
    adapter = create_adapter("tent", config)
    model = adapter.prepare(tiny_model(norm))
    segments = make_segments(adapter, model)
    for want, got in zip(alone(adapter, model, segments), adapter.step_many(model, segments), strict=True):
        assert_same_result(want, got)


def test_default_step_many_steps_each_segment() -> None:
    """The base-class default is ``step`` per segment, for methods that do not fuse."""
    adapter, model, _ = build("tent", NormKind.GN)
    segments = make_segments(adapter, model)
    for want, got in zip(alone(adapter, model, segments), Adapter.step_many(adapter, model, segments), strict=True):
        assert torch.equal(want.logits, got.logits)
        assert want.state.meta == got.state.meta


@pytest.mark.parametrize("name", ["bn", "alpha_bn", "adab2n", "tent"])
def test_single_sample_bn1d_segments_keep_the_source(name: str) -> None:
    """A BN1d layer with one sample in a segment uses the source there, as a lone step does."""

    class Head1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_model(NormKind.BN)
            self.norm = nn.BatchNorm1d(10)
            with torch.no_grad():
                assert self.norm.running_mean is not None and self.norm.running_var is not None
                self.norm.running_mean.normal_(0.0, 0.3)
                self.norm.running_var.uniform_(0.5, 2.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # the ReLU keeps the body's last BN bias from being a pure per-batch shift, which the BN1d
            # would remove (a structurally zero gradient: rounding noise that Adam amplifies)
            out: torch.Tensor = self.norm(torch.relu(self.body(x)))
            return out

    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    model = adapter.prepare(Head1d().eval())
    segments = make_segments(adapter, model)
    for want, got in zip(alone(adapter, model, segments), adapter.step_many(model, segments), strict=True):
        assert_same_result(want, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "norm"), CASES)
def test_step_many_on_cuda_matches_each_stream_alone(name: str, norm: NormKind) -> None:
    """The layout tensors and per-segment statistics follow the model's device."""
    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    model = adapter.prepare(tiny_model(norm).cuda())
    aux = {role: adapter.prepare(tiny_model(norm, 100, width=12).cuda()) for role in adapter.auxiliary_models()}
    if aux:
        adapter.bind_auxiliary(aux)
    segments = make_segments(adapter, model, device="cuda")
    assert all(seg.x.is_cuda for seg in segments)
    # the second round continues from the fused states (packed where the method packs them)
    assert_rounds_match_alone(adapter, model, segments, rounds=2, seed=500)
