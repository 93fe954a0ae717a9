"""The adapter contract, checked for every registered method and every norm type it supports.

Each test builds a tiny model (two "stages", 8-16 channels, 8x8 inputs): the contract is about
state handling, not accuracy, and the suite must run in seconds on a busy CPU.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from typing import Any

import pytest
import torch
from torch import nn

import adapters
from adapters.base import Adapter, Segment, StepResult, StreamState
from adapters.errors import UnsupportedModelError
from adapters.norms import ChannelLayerNorm, NormKind
from adapters.registry import create_adapter, method_class
from adapters.serialize import state_from_bytes, state_to_bytes

NUM_CLASSES = 10

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CI machine

TEST_CONFIGS: dict[str, dict[str, Any]] = {
    # loose filters and small cloud batches so that every code path runs within a few steps
    "sar": {"margin_e0": 1.0, "lr": 0.01},
    "cema": {
        "teacher": "tiny-teacher",
        "ent_high_margin": 1.0,
        "ent_low_margin": None,
        "d_margin": None,
        "warm_up_samples": 4,
        "cloud_batch_size": 4,
        "replay_start": 4,
        "replay_buffer_size": 10,
        "replay_ratio": 1,
    },
    "unmix_tns": {"num_components": 4},
    "tent": {"lr": 0.01},
}


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """One norm layer of ``kind``."""
    if kind is NormKind.BN:
        return nn.BatchNorm2d(channels)
    if kind is NormKind.GN:
        return nn.GroupNorm(2, channels)
    return ChannelLayerNorm(channels)


class TinyNet(nn.Module):
    """conv-norm stem, two stages (containers), pooled linear head."""

    def __init__(self, norm: NormKind | None, width: int = 8) -> None:
        super().__init__()

        def norm_or_id(c: int) -> nn.Module:
            return make_norm(norm, c) if norm is not None else nn.Identity()

        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.norm = norm_or_id(width)
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), norm_or_id(width), nn.ReLU())
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            norm_or_id(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            norm_or_id(2 * width),
        )
        self.head = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm(self.conv(x)))
        out = self.stage2(self.stage1(out))
        logits: torch.Tensor = self.head(out.mean(dim=(2, 3)))
        return logits


def tiny_model(norm: NormKind | None, seed: int = 0, width: int = 8) -> TinyNet:
    """A TinyNet with non-trivial source statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = TinyNet(norm, width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def batches(count: int, size: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic input batches (shifted and scaled, like a corrupted stream)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=gen) * 1.5 + 0.3 for _ in range(count)]


def build(name: str, norm: NormKind, seed: int = 0) -> tuple[Adapter[Any], nn.Module, nn.Module]:
    """(adapter with auxiliary models bound, prepared model, the untouched base model)."""
    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    base = tiny_model(norm, seed)
    prepared = adapter.prepare(base)
    aux = {role: adapter.prepare(tiny_model(norm, seed + 100, width=12)) for role in adapter.auxiliary_models()}
    if aux:
        adapter.bind_auxiliary(aux)
    adapter.check_model(prepared)
    return adapter, prepared, base


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer (non-persistent ones included)."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return {k: v.detach().clone() for k, v in tensors.items()}


def run(
    adapter: Adapter[Any], model: nn.Module, xs: list[torch.Tensor], state: StreamState
) -> tuple[list[StepResult], StreamState]:
    """Step through ``xs``; returns every result and the final state."""
    results = []
    for x in xs:
        result = adapter.step(model, x, state)
        results.append(result)
        state = result.state
    return results, state


def assert_same_state(a: StreamState, b: StreamState) -> None:
    assert a.meta == b.meta
    assert set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert a.tensors[key].dtype == b.tensors[key].dtype, key
        assert torch.equal(a.tensors[key], b.tensors[key]), key


CASES = [
    pytest.param(name, norm, id=f"{name}-{norm.value}")
    for name in adapters.method_names()
    for norm in NormKind
    if norm in method_class(name).supported_norms
]
UNSUPPORTED = [
    pytest.param(name, norm, id=f"{name}-{norm.value}")
    for name in adapters.method_names()
    for norm in NormKind
    if norm not in method_class(name).supported_norms
]


def test_every_method_is_covered() -> None:
    names = {"source", "bn", "tent", "alpha_bn", "unmix_tns", "sar", "cema", "adab2n"}
    assert names <= set(adapters.method_names())


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_class_attributes(name: str, norm: NormKind) -> None:
    cls = method_class(name)
    assert cls.predicts in {"before_update", "after_update", "no_update"}
    assert cls.batch_size_one
    assert cls.supported_norms
    assert cls.__module__ and (cls.__doc__ or "")
    assert (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip()


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_shared_model_is_bit_identical_and_gradient_free(name: str, norm: NormKind) -> None:
    adapter, model, base = build(name, norm)
    before, base_before = snapshot(model), snapshot(base)
    results, _ = run(adapter, model, batches(4), adapter.init_state(model, seed=3))
    assert all(torch.isfinite(r.logits).all() for r in results)
    after = snapshot(model)
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for key, value in snapshot(base).items():
        assert torch.equal(base_before[key], value), key
    for key, param in model.named_parameters():
        assert not param.requires_grad, key
        assert param.grad is None, key
    assert all(param.grad is None for param in base.parameters())
    assert not any(r.logits.requires_grad for r in results)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_prepared_model_alone_is_the_source_model(name: str, norm: NormKind) -> None:
    _, model, base = build(name, norm)
    x = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_input_state_is_not_mutated(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    _, state = run(adapter, model, batches(2), adapter.init_state(model, seed=1))
    frozen = StreamState({k: v.clone() for k, v in state.tensors.items()}, state.meta)
    for x in batches(3, seed=5):
        adapter.step(model, x, state)
    assert_same_state(frozen, state)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_streams_are_isolated(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    xs_a, xs_b = batches(3, seed=1), batches(3, size=2, seed=2)
    alone_a, final_a = run(adapter, model, xs_a, adapter.init_state(model, seed=1))
    alone_b, final_b = run(adapter, model, xs_b, adapter.init_state(model, seed=2))
    state_a, state_b = adapter.init_state(model, seed=1), adapter.init_state(model, seed=2)
    for i in range(3):
        ra = adapter.step(model, xs_a[i], state_a)
        rb = adapter.step(model, xs_b[i], state_b)
        assert torch.equal(ra.logits, alone_a[i].logits)
        assert torch.equal(rb.logits, alone_b[i].logits)
        state_a, state_b = ra.state, rb.state
    assert_same_state(state_a, final_a)
    assert_same_state(state_b, final_b)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_seeded_runs_are_deterministic(name: str, norm: NormKind) -> None:
    adapter1, model1, _ = build(name, norm)
    adapter2, model2, _ = build(name, norm)
    res1, state1 = run(adapter1, model1, batches(3), adapter1.init_state(model1, seed=7))
    res2, state2 = run(adapter2, model2, batches(3), adapter2.init_state(model2, seed=7))
    for r1, r2 in zip(res1, res2, strict=True):
        assert torch.equal(r1.logits, r2.logits)
        assert r1.info == r2.info
    assert_same_state(state1, state2)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_state_round_trips_through_safetensors(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    _, state = run(adapter, model, batches(3), adapter.init_state(model, seed=4, model_hash="abc"))
    reloaded = state_from_bytes(state_to_bytes(state))
    assert_same_state(state, reloaded)
    # Continuing from the reloaded copy must match continuing from the original. Not bit for bit:
    # on some CPUs two identical updates differ in the last bit (seen with SAR on a GroupNorm
    # model, intermittently), so this comparison allows float rounding and nothing more.
    for x in batches(2, seed=9):
        original, resumed = adapter.step(model, x, state), adapter.step(model, x, reloaded)
        torch.testing.assert_close(original.logits, resumed.logits, rtol=1e-5, atol=1e-6)
        assert original.state.meta == resumed.state.meta
        assert set(original.state.tensors) == set(resumed.state.tensors)
        for key, value in original.state.tensors.items():
            torch.testing.assert_close(value, resumed.state.tensors[key], rtol=1e-5, atol=1e-6, msg=key)
        state, reloaded = original.state, resumed.state


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_the_order_of_a_states_tensors_changes_nothing(name: str, norm: NormKind) -> None:
    """A state read back from bytes holds its tensors in the reader's order, not the method's (safetensors'
    order varies between processes): stepping it must give exactly what the method's own order gives, bit
    for bit, or a stream restored or served by another replica would round differently from the original."""
    adapter, model, _ = build(name, norm)
    _, start = run(adapter, model, batches(2), adapter.init_state(model, seed=4, model_hash="abc"))
    for shuffle in range(8):  # a float sum rounds differently in some orders only: several orders
        names = list(start.tensors)
        random.Random(shuffle).shuffle(names)
        state, reordered = start, StreamState({k: start.tensors[k] for k in names}, start.meta)
        for x in batches(3, seed=9):
            original, resumed = adapter.step(model, x, state), adapter.step(model, x, reordered)
            assert torch.equal(original.logits, resumed.logits)
            assert_same_state(original.state, resumed.state)
            state, reordered = original.state, resumed.state
    x, other = batches(1, seed=11)[0], batches(1)[0]
    [in_order, _] = adapter.step_many(model, [Segment(x, state), Segment(other, state)])
    [reordered_fused, _] = adapter.step_many(model, [Segment(x, reordered), Segment(other, state)])
    assert torch.equal(in_order.logits, reordered_fused.logits)
    assert_same_state(in_order.state, reordered_fused.state)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_batch_size_one(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    results, state = run(adapter, model, batches(6, size=1), adapter.init_state(model))
    for result in results:
        assert result.logits.shape == (1, NUM_CLASSES)
        assert torch.isfinite(result.logits).all()
    assert all(torch.isfinite(t.float()).all() or t.numel() == 0 for k, t in state.tensors.items() if "ema" not in k)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_dry_run_leaves_state_unchanged(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    _, state = run(adapter, model, batches(2), adapter.init_state(model, seed=2))
    x = batches(1, seed=11)[0]
    dry = adapter.step(model, x, state, adapt=False)
    assert_same_state(dry.state, state)
    assert not dry.info.adapted
    assert dry.info.backwards == 0
    wet = adapter.step(model, x, state)
    torch.testing.assert_close(dry.logits, wet.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_step_info_reports_counts_and_drift(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    results, state = run(adapter, model, batches(3), adapter.init_state(model))
    for result in results:
        info = result.info
        assert info.samples == 4
        assert 0 <= info.samples_used <= info.samples
        assert 0 <= info.samples_filtered <= info.samples
        assert info.forwards >= 1
        assert info.backwards >= 0
        # method figures only: the server scores entropy and confidence per answered row itself
        assert not {"entropy_mean", "max_prob_mean"} & set(info.extra)
        assert all(isinstance(v, float) and math.isfinite(v) for v in info.extra.values()), info.extra
    assert state.meta.step == 3
    assert state.meta.method == name


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_reset_returns_to_source(name: str, norm: NormKind) -> None:
    adapter, model, _ = build(name, norm)
    fresh = adapter.init_state(model, seed=5)
    _, adapted = run(adapter, model, batches(3), fresh)
    reset = adapter.reset(model, adapted)
    assert reset.meta.step == adapted.meta.step
    assert reset.meta.seed == 5
    x = batches(1, seed=12)[0]
    torch.testing.assert_close(
        adapter.step(model, x, reset, adapt=False).logits, adapter.step(model, x, fresh, adapt=False).logits
    )


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_exported_tensors_load_into_the_plain_model(name: str, norm: NormKind) -> None:
    adapter, model, base = build(name, norm)
    _, state = run(adapter, model, batches(3), adapter.init_state(model))
    version, tensors = adapter.export_tensors(state)
    assert isinstance(version, int)
    device_model = copy.deepcopy(base)
    _missing, unexpected = device_model.load_state_dict(tensors, strict=False)
    assert not unexpected


@pytest.mark.parametrize(("name", "norm"), UNSUPPORTED)
def test_unsupported_norms_are_rejected(name: str, norm: NormKind) -> None:
    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    with pytest.raises(UnsupportedModelError):
        adapter.check_model(adapter.prepare(tiny_model(norm)))


@pytest.mark.parametrize("name", [n for n in adapters.method_names() if n != "source"])
def test_models_without_norm_layers_are_rejected(name: str) -> None:
    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    with pytest.raises(UnsupportedModelError):
        adapter.check_model(adapter.prepare(tiny_model(None)))


@pytest.mark.parametrize("name", adapters.method_names())
def test_prepare_leaves_its_input_untouched(name: str) -> None:
    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    base = tiny_model(NormKind.BN)
    types_before = [type(m) for m in base.modules()]
    adapter.prepare(base)
    assert [type(m) for m in base.modules()] == types_before


def test_interleaved_methods_share_nothing() -> None:
    """Different methods on the same base model do not see each other's state."""
    base = tiny_model(NormKind.BN)
    outputs = {}
    for name, _ in itertools.product(["bn", "adab2n", "unmix_tns"], range(1)):
        adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
        model = adapter.prepare(base)
        outputs[name] = run(adapter, model, batches(2), adapter.init_state(model))[0][-1].logits
    assert not torch.equal(outputs["bn"], outputs["adab2n"])


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_adapting_methods_change_predictions(name: str, norm: NormKind) -> None:
    """Guards against a silently inert method (e.g. per-call tensors that no layer reads)."""
    adapter, model, base = build(name, norm)
    xs = batches(3)
    results, _ = run(adapter, model, xs, adapter.init_state(model))
    with torch.no_grad():
        differs = [not torch.allclose(r.logits, base(x), atol=1e-6) for r, x in zip(results, xs, strict=True)]
    # `auto` keeps models without BN layers in its source regime (docs/methods.md): exactly the source model
    inert = method_class(name).predicts == "no_update" or (name == "auto" and norm != NormKind.BN)
    assert any(differs) == (not inert)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "norm"), CASES)
def test_runs_on_cuda_and_round_trips(name: str, norm: NormKind) -> None:
    """Per-call tensors, generators and buffers must follow the model's device."""
    adapter = create_adapter(name, TEST_CONFIGS.get(name, {}))
    model = adapter.prepare(tiny_model(norm).cuda())
    aux = {role: adapter.prepare(tiny_model(norm, 100, width=12).cuda()) for role in adapter.auxiliary_models()}
    if aux:
        adapter.bind_auxiliary(aux)
    xs = [x.cuda() for x in batches(3)] + [x.cuda() for x in batches(3, size=1)]
    results, state = run(adapter, model, xs, adapter.init_state(model, seed=1))
    assert all(r.logits.is_cuda and torch.isfinite(r.logits).all() for r in results)
    reloaded = state_from_bytes(state_to_bytes(state), device="cuda")
    x = batches(1, seed=3)[0].cuda()
    torch.testing.assert_close(adapter.step(model, x, state).logits, adapter.step(model, x, reloaded).logits)
