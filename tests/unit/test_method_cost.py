"""The cost benchmark counts real passes, and every method reports the passes it really runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters import create_adapter
from adapters.errors import UnsupportedModelError
from adapters.norms import NormKind
from adapters.registry import method_names
from benchmarks.method_cost import (
    CostRow,
    PassCounter,
    add_ratios,
    markdown,
    measure,
    method_config,
    normalized_batches,
)
from tests.contract.test_adapter_contract import TEST_CONFIGS, batches, tiny_model


def _measure(method: str, norm: NormKind = NormKind.BN) -> CostRow:
    adapter = create_adapter(method, TEST_CONFIGS.get(method, {}))
    aux: dict[str, torch.nn.Module] = {r: tiny_model(norm, seed=1, width=16) for r in adapter.auxiliary_models()}
    return measure("tiny", tiny_model(norm), adapter, aux, batches(8, 8), warmup=2)


@pytest.mark.parametrize("method", method_names())
def test_counted_passes_match_what_the_method_reports(method: str) -> None:
    row = _measure(method)
    assert row.steps == 6 and row.batch_size == 8
    assert sum(row.forwards.values()) == row.reported_forwards
    assert row.backwards == row.reported_backwards
    assert row.images_per_s > 0
    assert row.state_bytes_initial >= 0 and row.state_bytes_final >= row.state_bytes_initial


def test_known_pass_counts() -> None:
    source, tent = _measure("source"), _measure("tent")
    assert (source.forwards, source.backwards) == ({"model": 1.0}, 0.0)
    assert (tent.forwards, tent.backwards) == ({"model": 1.0}, 1.0)
    sar = _measure("sar", NormKind.GN)
    assert (sar.forwards, sar.backwards) == ({"model": 2.0}, 2.0)  # SAM: two forwards, two backwards
    cema = _measure("cema")
    assert cema.forwards["teacher"] > 0 and cema.state_bytes_final > cema.state_bytes_initial  # replay buffer


def test_stateless_methods_hold_no_tensors_and_tent_holds_its_affine() -> None:
    assert _measure("source").state_bytes_final == 0
    model = tiny_model(NormKind.BN)
    affine = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert _measure("tent").state_bytes_initial >= 4 * affine


def test_unsupported_pair_is_refused_not_measured() -> None:
    with pytest.raises(UnsupportedModelError, match="adapts bn"):
        measure("tiny", tiny_model(NormKind.GN), create_adapter("unmix_tns"), {}, batches(3, 4), warmup=1)


def test_backward_counter_restores_autograd_grad() -> None:
    original = torch.autograd.grad
    counter = PassCounter({})
    with counter.counting_backwards():
        x = torch.ones(2, requires_grad=True)
        torch.autograd.grad((x * x).sum(), [x])
    assert counter.backwards == 1 and torch.autograd.grad is original


def test_normalized_batches_cycle_through_the_images() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    out = normalized_batches(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), batch_size=4, count=3)
    assert [b.shape for b in out] == [torch.Size([4, 3, 32, 32])] * 3
    assert torch.equal(out[0][0], out[1][1])  # image 0 again at position 5


def _row(model: str, method: str, ips: float) -> CostRow:
    return CostRow(model, method, {}, 64, 10, {"model": 1.0}, 0.0, 1.0, 0.0, 100, 100, ips)


def test_ratios_and_table() -> None:
    rows = [_row("m", "source", 1000.0), _row("m", "tent", 250.0), _row("other", "tent", 10.0)]
    add_ratios(rows)
    assert [r.ratio_to_source for r in rows] == [1.0, 0.25, None]
    table = markdown(rows, ["bn on m-gn"], "header")
    assert "| m | tent | 64 | 1 | 0 | 1 / 0 | 100 | 250 | 0.25 |" in table
    assert "| other | tent | 64 | 1 | 0 | 1 / 0 | 100 | 10 | – |" in table
    assert "Not applicable (refused when a stream is configured): bn on m-gn." in table
    assert table.startswith("# Cost per method") and "\nheader\n" in table


def test_cema_is_measured_with_a_margin_that_lets_samples_through() -> None:
    assert method_config("tent", "resnet56", 10) == {}
    assert method_config("cema", "resnet56", 10) == {"teacher": "resnet56", "d_margin": 0.4}
    assert method_config("cema", "big", 1000) == {"teacher": "big"}
