"""The regime logic of ``auto`` on synthetic signals, and its visibility in step info."""

from __future__ import annotations

import math

import torch

from adapters.auto import (
    REGIME_BATCH_MIX,
    REGIME_COMPONENTS,
    REGIME_SOURCE,
    AutoConfig,
    AutoSignals,
    batch_diversity,
    next_signals,
    regime_name,
    wanted_regime,
)
from adapters.norms import NormKind
from adapters.registry import create_adapter
from adapters.unmix_tns import spread_components
from tests.contract.test_adapter_contract import batches, tiny_model

CFG = AutoConfig()
LIMIT = CFG.harm_margin * math.log(10)


def test_batch_statistics_only_for_large_balanced_batches() -> None:
    assert wanted_regime(64, 0.9, 0.1, CFG) == REGIME_BATCH_MIX
    assert wanted_regime(1, 1.0, 0.0, CFG) == REGIME_COMPONENTS  # a single image
    assert wanted_regime(8, 0.9, 0.1, CFG) == REGIME_COMPONENTS  # below min_batch
    assert wanted_regime(64, 0.2, 0.1, CFG) == REGIME_COMPONENTS  # one or two classes
    assert wanted_regime(64, 0.9, 0.6, CFG) == REGIME_COMPONENTS  # far from the stream's class mix


def test_diversity_counts_effective_classes() -> None:
    one_class = torch.zeros(64, 10)
    one_class[:, 3] = 1.0
    assert batch_diversity(one_class) < 0.11
    balanced = torch.eye(10).repeat(7, 1)
    assert batch_diversity(balanced) > 0.99


def test_harmful_adaptation_falls_back_to_source_with_hysteresis() -> None:
    s = AutoSignals()
    s = next_signals(s, REGIME_BATCH_MIX, -0.5, 10, CFG)  # adaptation makes the model surer
    assert s.regime == REGIME_BATCH_MIX and not s.harmful and s.switches == 0
    for _ in range(30):  # adapted predictions become much less sure than the source's
        s = next_signals(s, REGIME_BATCH_MIX, 3 * LIMIT, 10, CFG)
    assert s.regime == REGIME_SOURCE and s.harmful and s.switches == 1
    s = next_signals(s, REGIME_BATCH_MIX, 0.6 * LIMIT, 10, CFG)  # between half and full limit: stays
    assert s.regime == REGIME_SOURCE
    for _ in range(60):
        s = next_signals(s, REGIME_COMPONENTS, -0.2, 10, CFG)
    assert s.regime == REGIME_COMPONENTS and not s.harmful and s.switches == 2
    assert s.batches == 92


def test_signals_round_trip_and_names() -> None:
    s = AutoSignals(regime=REGIME_COMPONENTS, harmful=True, gap_ema=0.25, switches=7, batches=40)
    assert AutoSignals.from_tensor(s.to_tensor()) == s
    assert regime_name(1.0) == "batch_mix" and regime_name(None) is None and regime_name(9.0) is None


def test_spread_components_match_the_source_exactly_and_ignore_the_seed() -> None:
    mean, var = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([4.0, 1.0, 0.25])
    means, variances = spread_components(mean, var, 16, 0.5)
    assert torch.allclose(means.mean(0), mean, atol=1e-6)
    assert torch.allclose(variances.mean(0) + means.var(0, correction=0), var, atol=1e-5)
    assert torch.equal(means, spread_components(mean, var, 16, 0.5)[0])


def test_steps_report_the_regime_and_states_do_not_depend_on_the_seed() -> None:
    adapter = create_adapter("auto", {"min_batch": 4, "diversity_min": 0.0, "imbalance_max": 1.0})
    model = adapter.prepare(tiny_model(NormKind.BN))
    a, b = adapter.init_state(model, seed=1), adapter.init_state(model, seed=2)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    result = adapter.step(model, batches(1, size=8)[0], a)
    assert result.info.extra["regime"] in (REGIME_SOURCE, REGIME_BATCH_MIX)
    assert result.info.forwards == 3
    single = adapter.step(model, batches(1, size=1)[0], result.state)
    assert single.info.extra["regime"] in (REGIME_SOURCE, REGIME_COMPONENTS)


def test_gn_and_ln_models_stay_in_the_source_regime() -> None:
    """No BN layer to calibrate: every answer is the source model's, named `source`, and steps still count."""
    for norm in (NormKind.GN, NormKind.LN):
        adapter = create_adapter("auto")
        base = tiny_model(norm)
        adapter.check_model(base)
        model = adapter.prepare(base)
        state = adapter.init_state(model)
        for x in batches(3, size=5) + batches(2, size=1, seed=4):
            result = adapter.step(model, x, state)
            with torch.no_grad():
                torch.testing.assert_close(result.logits, base(x), rtol=0, atol=0)
            assert regime_name(result.info.extra["regime"]) == "source"
            state = result.state
        assert state.meta.step == 5
