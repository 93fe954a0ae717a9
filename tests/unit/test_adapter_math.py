"""The methods' formulas on tiny tensors, against values computed by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from adapters import replay
from adapters.adab2n import AdaB2N, batch_eta, eta_at, eta_fixed_point, eta_next
from adapters.alpha_bn import AlphaBatchNorm, mix_statistics
from adapters.cema import (
    distillation_loss,
    dynamic_threshold,
    redundancy_margin,
    select_samples,
    update_prob_ema,
    weighted_entropy,
)
from adapters.functional import adam_step, entropy, entropy_margin, sgd_step
from adapters.norms import ChannelLayerNorm
from adapters.registry import create_adapter
from adapters.sar import ema_update, sam_perturbation
from adapters.unmix_tns import (
    UnMixBatchNorm,
    assignment,
    batch_momentum,
    init_components,
    mixed_statistics,
    update_components,
)

torch.set_num_threads(1)
LN2 = math.log(2.0)


def close(a: torch.Tensor | None, b: object, atol: float = 1e-6) -> None:
    assert a is not None
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# -- α-BN -----------------------------------------------------------------------------------------


def test_alpha_bn_mixing_formula() -> None:
    mean, var = mix_statistics(
        torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 2.0]), 0.9
    )
    close(mean, [1.2, 1.8])
    close(var, [1.1, 3.8])


def test_alpha_bn_layer_normalizes_with_mixed_unbiased_statistics() -> None:
    bn = nn.BatchNorm2d(1).eval()
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(1.0)
    layer = AlphaBatchNorm(bn)
    layer.source_weight = torch.tensor(0.5)
    layer.unbiased = torch.tensor(1.0)
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).reshape(2, 1, 1, 2)
    # batch mean 3, unbiased variance 20/3; mixed: mean 2, var (1 + 20/3)/2 = 23/6
    close(layer(x), (x - 2.0) / math.sqrt(23 / 6 + bn.eps), atol=1e-5)
    layer.unbiased = torch.tensor(0.0)  # biased variance 5 -> var 3
    close(layer(x), (x - 2.0) / math.sqrt(3.0 + bn.eps), atol=1e-5)
    layer.source_weight = None  # no per-call tensor: the source layer
    close(layer(x), bn(x))


# -- UnMix-TNS ------------------------------------------------------------------------------------


def test_unmix_assignment_is_a_cosine_softmax() -> None:
    p = assignment(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), 1.0)
    e = math.e
    close(p, [[e / (e + 1), 1 / (e + 1)]])


def test_unmix_mixed_statistics_by_hand() -> None:
    p = torch.tensor([[0.75, 0.25]])
    inst_mean, inst_var = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    means, variances = torch.tensor([[0.0], [4.0]]), torch.tensor([[1.0], [3.0]])
    mean, var = mixed_statistics(p, inst_mean, inst_var, means, variances)
    # m = [0.25*0 + 0.75*2, 0.75*4 + 0.25*2] = [1.5, 3.5]; v = [0.25*1 + 0.75*1, 0.75*3 + 0.25*1] = [1, 2.5]
    # mean = 2.5; var = mean(v) + mean(m^2) - mean^2 = 1.75 + (2.25 + 12.25)/2 - 6.25 = 2.75
    close(mean, [[2.5]])
    close(var, [[2.75]])


def test_unmix_component_update_by_hand() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    inst_mean = torch.tensor([[2.0], [4.0]])
    inst_var = torch.tensor([[1.0], [3.0]])
    means, variances = torch.tensor([[0.0], [4.0]]), torch.tensor([[1.0], [1.0]])
    new_means, new_vars = update_components(p, inst_mean, inst_var, means, variances, 0.5)
    # k=0: 0 + 0.5 * mean(1*(2-0), 0.5*(4-0)) = 1.0 ; k=1: 4 + 0.5 * mean(0, 0.5*(4-4)) = 4
    close(new_means, [[1.0], [4.0]])
    # k=0: 1 + 0.5 * mean(1*(1-1), 0.5*(3-1)) = 1.25 ; k=1: 1 + 0.5 * mean(0, 0.5*(3-1)) = 1.25
    close(new_vars, [[1.25], [1.25]])


def test_unmix_momentum_is_corrected_by_the_actual_batch_size() -> None:
    assert batch_momentum(0.1, 64, 64) == pytest.approx(0.1)
    assert batch_momentum(0.1, 1, 64) == pytest.approx(1 - 0.9 ** (1 / 64))
    assert batch_momentum(0.1, 1, 64) == pytest.approx(0.00165, abs=1e-5)


def test_unmix_initialization_is_seeded_and_centred_on_the_source() -> None:
    mean, var = torch.tensor([1.0, -1.0]), torch.tensor([4.0, 1.0])
    a = init_components(mean, var, 4, 0.5, torch.Generator().manual_seed(3))
    b = init_components(mean, var, 4, 0.5, torch.Generator().manual_seed(3))
    c = init_components(mean, var, 4, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    close(a[1], [[2.0, 0.5]] * 4)
    one = init_components(mean, var, 1, 0.5, torch.Generator().manual_seed(3))
    close(one[0], [[1.0, -1.0]])
    close(one[1], [[4.0, 1.0]])
    # the spread sqrt(a*K/(K-1)) * sigma keeps the mixture variance at the source in expectation
    big_means, big_vars = init_components(mean, var, 20000, 0.5, torch.Generator().manual_seed(0))
    mixture_var = big_vars.mean(0) + big_means.var(0, correction=0)
    close(mixture_var, [4.0, 1.0], atol=0.1)


def test_unmix_layer_with_one_component_is_instance_normalization() -> None:
    bn = nn.BatchNorm2d(2).eval()
    layer = UnMixBatchNorm(bn)
    assert bn.running_mean is not None and bn.running_var is not None
    layer.unmix_means, layer.unmix_vars = init_components(
        bn.running_mean, bn.running_var, 1, 0.5, torch.Generator().manual_seed(0)
    )
    layer.unmix_hyper = torch.tensor([0.07, 0.1, 64.0])
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 1
    expected = nn.functional.instance_norm(x, eps=bn.eps)
    close(layer(x), expected, atol=1e-5)
    # the single component moved towards the instance means with M = 1 - 0.9^(3/64)
    m = 1 - 0.9 ** (3 / 64)
    close(layer.unmix_means, m * x.mean(dim=(2, 3)).mean(0, keepdim=True), atol=1e-6)


# -- AdaB²N ---------------------------------------------------------------------------------------


def test_adab2n_eta_recursion_and_closed_form() -> None:
    m, kappa = 0.1, 0.4
    eta = m**kappa
    assert eta_at(1, m, kappa) == pytest.approx(eta)
    for t in range(2, 30):
        eta = eta / (eta + (1 - m) ** kappa)
        assert eta_next(eta_at(t - 1, m, kappa), m, kappa) == pytest.approx(eta)
        assert eta_at(t, m, kappa) == pytest.approx(eta)


def test_adab2n_fixed_point() -> None:
    for m, kappa, expected in [(0.1, 0.1, 0.0105), (0.1, 0.4, 0.041), (0.1, 0.7, 0.071), (0.1, 1.0, 0.1)]:
        star = eta_fixed_point(m, kappa)
        assert star == pytest.approx(expected, abs=5e-4)
        assert eta_next(star, m, kappa) == pytest.approx(star)
        assert eta_at(10_000, m, kappa) == pytest.approx(star)
    # kappa = 0: the cumulative average 1/t; kappa = 1: BN-EMA
    assert [eta_at(t, 0.1, 0.0) for t in (1, 2, 3)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert eta_at(5, 0.1, 1.0) == pytest.approx(0.1)
    assert batch_eta(0.1, 64, 64) == pytest.approx(0.1)
    assert batch_eta(0.1, 1, 64) == pytest.approx(1 - 0.9 ** (1 / 64))


def test_adab2n_starts_at_the_fixed_point_and_treats_the_source_as_prior() -> None:
    adapter = AdaB2N({"kappa": 0.1})
    assert adapter.initial_eta() == pytest.approx(eta_fixed_point(0.1, 0.1))
    warm = AdaB2N({"kappa": 0.1, "source_prior_batches": 3})
    assert warm.initial_eta() == pytest.approx(eta_at(4, 0.1, 0.1))

    bn = nn.BatchNorm2d(2)
    assert bn.running_mean is not None
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    base = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), bn).eval()
    model = adapter.prepare(base)
    state = adapter.init_state(model)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    result = adapter.step(model, x, state)
    with torch.no_grad():
        h = base[0](x)
    eta = eta_fixed_point(0.1, 0.1)
    expected_mean = (1 - eta) * torch.tensor([1.0, -1.0]) + eta * h.mean(dim=(0, 2, 3))
    expected_var = (1 - eta) * torch.ones(2) + eta * h.var(dim=(0, 2, 3), correction=0)
    close(result.state.tensors["stats/1.running_mean"], expected_mean)
    close(result.state.tensors["stats/1.running_var"], expected_var)
    assert float(result.state.tensors["eta"]) == pytest.approx(eta)


# -- SAR ------------------------------------------------------------------------------------------


def test_entropy_margins_scale_with_ln_c() -> None:
    assert entropy_margin(0.4, 1000) == pytest.approx(2.763, abs=1e-3)
    assert entropy_margin(0.4, 10) == pytest.approx(0.4 * math.log(10))
    close(entropy(torch.zeros(1, 4)), [math.log(4)])


def test_sar_reliable_filter() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    e0 = entropy_margin(0.4, 3)
    # uniform (ln 3 = 1.10) is unreliable; peaked (~0.001) reliable; [1, .5, 0] has entropy 1.02 > 0.44
    assert (entropy(logits) < e0).tolist() == [False, True, False]


def test_sam_perturbation_uses_one_global_norm() -> None:
    eps = sam_perturbation({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}, rho=0.05)
    close(eps["a"], [0.03, 0.0])
    close(eps["b"], [0.04])


def test_sam_perturbation_sums_in_the_given_order_whatever_the_dicts() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {f"t{i}": torch.randn(8, generator=gen) * (1 + i / 7) for i in range(16)}
    model_order = list(grads)
    in_order = sam_perturbation(grads, rho=0.05)
    differing = 0
    for seed in range(50):
        names = list(grads)
        random.Random(seed).shuffle(names)
        shuffled = {k: grads[k] for k in names}
        unordered = sam_perturbation(shuffled, rho=0.05)
        differing += any(not torch.equal(unordered[k], in_order[k]) for k in grads)
        ordered = sam_perturbation(shuffled, rho=0.05, order=model_order)
        assert all(torch.equal(ordered[k], in_order[k]) for k in grads)
    assert differing > 0  # the dict's order does change the rounding of some sums: the order is what fixes it


def test_sar_loss_ema() -> None:
    assert ema_update(math.nan, 2.0, 0.9) == 2.0
    assert ema_update(2.0, 1.0, 0.9) == pytest.approx(1.9)


def _tiny_gn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5)
    ).eval()


def test_sar_skips_the_update_when_no_sample_is_reliable() -> None:
    adapter = create_adapter("sar", {"margin_e0": 1e-6, "freeze": "none"})
    model = adapter.prepare(_tiny_gn())
    state = adapter.init_state(model)
    result = adapter.step(model, torch.randn(4, 3, 4, 4), state)
    assert (result.info.samples_used, result.info.samples_filtered, result.info.backwards) == (0, 4, 0)
    for key, value in state.tensors.items():
        assert torch.equal(value, result.state.tensors[key]) or (value.isnan().all() and key == "ema")


def test_sar_resets_when_the_loss_ema_collapses() -> None:
    # reset_margin 1.0 means e_m = ln C: any reliable loss is below it, so the first update resets
    adapter = create_adapter("sar", {"margin_e0": 1.0, "reset_margin": 1.0, "lr": 0.5, "freeze": "none"})
    model = adapter.prepare(_tiny_gn())
    state = adapter.init_state(model)
    result = adapter.step(model, torch.randn(4, 3, 4, 4), state)
    assert result.info.resets == 1
    assert math.isnan(float(result.state.tensors["ema"]))  # the EMA is cleared (SAR issue #4 fixed)
    for key in state.tensors:
        if key != "ema":
            assert torch.equal(state.tensors[key], result.state.tensors[key]), key
    # without the trigger, the same step updates and keeps an EMA
    keep = create_adapter("sar", {"margin_e0": 1.0, "reset_margin": 0.0, "lr": 0.5, "freeze": "none"})
    kept = keep.step(model, torch.randn(4, 3, 4, 4), keep.init_state(model))
    assert kept.info.resets == 0 and not math.isnan(float(kept.state.tensors["ema"]))


def test_sar_freezes_the_top_stage_structurally() -> None:
    base = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)),
        nn.Sequential(nn.Conv2d(4, 4, 1), ChannelLayerNorm(4), nn.Conv2d(4, 4, 1), ChannelLayerNorm(4)),
        nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    adapter = create_adapter("sar")
    state = adapter.init_state(adapter.prepare(base))
    assert sorted(k for k in state.tensors if k.startswith("affine/")) == [
        "affine/1.bias", "affine/1.weight", "affine/2.1.bias", "affine/2.1.weight",
    ]  # fmt: skip


# -- functional optimizers ------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_functional_optimizers_match_torch(optimizer: str) -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, generator=gen)
    grads = [torch.randn(5, generator=gen) for _ in range(3)]
    ref = nn.Parameter(start.clone())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
        if optimizer == "sgd"
        else torch.optim.Adam([ref], lr=0.1, weight_decay=0.01)
    )
    params, m1, m2 = {"p": start.clone()}, {"p": torch.zeros(5)}, {"p": torch.zeros(5)}
    for i, g in enumerate(grads):
        ref.grad = g.clone()
        opt.step()
        if optimizer == "sgd":
            params, m1 = sgd_step(params, {"p": g}, m1, 0.1, 0.9, 0.01)
        else:
            params, m1, m2 = adam_step(params, {"p": g}, m1, m2, i + 1, 0.1, weight_decay=0.01)
    close(params["p"], ref.detach(), atol=1e-6)


# -- CEMA -----------------------------------------------------------------------------------------


def test_cema_dynamic_threshold() -> None:
    assert dynamic_threshold(2.0, avg_now=1.5, avg_at_warmup=1.0, coeff=0.8) == pytest.approx(2.4)


def test_cema_sample_selection() -> None:
    ent = torch.tensor([0.1, 0.5, 1.0, 2.0])
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    # reliable: entropy < 1.5 ; informative: entropy > 0.2
    assert select_samples(ent, probs, 1.5, 0.2, None, 0.05).tolist() == [False, True, True, False]
    # redundancy: |cos(p, m)| < d_margin with m = [1, 0] drops the samples similar to the history
    assert select_samples(ent, probs, 1.5, None, torch.tensor([1.0, 0.0]), 0.5).tolist() == [False, True, False, False]
    assert update_prob_ema(None, probs[:0]) is None
    close(update_prob_ema(None, probs[:2]), [0.5, 0.5])
    close(update_prob_ema(torch.tensor([1.0, 0.0]), probs[1:2]), [0.9, 0.1])


def test_cema_auto_redundancy_margin_scales_with_class_count() -> None:
    # EATA's margin 0.05 at its ImageNet scale (C = 1000), scaled by 1/sqrt(C) like the cosines
    # between probability vectors it is compared with (cos(one-hot, uniform) = 1/sqrt(C)).
    assert redundancy_margin("auto", 1000) == pytest.approx(0.05)
    assert redundancy_margin("auto", 10) == pytest.approx(0.5)
    assert redundancy_margin("auto", 2) == 1.0
    assert redundancy_margin(0.3, 10) == 0.3 and redundancy_margin(None, 10) is None
    # at C = 10 the auto margin keeps a sample unlike the history that the ImageNet margin drops
    probs = torch.tensor([[0.9, 0.1] + [0.0] * 8])
    history = torch.full((10,), 0.1)
    cos = float(torch.nn.functional.cosine_similarity(history[None], probs)[0])
    assert 0.05 < cos < 0.5
    assert select_samples(torch.tensor([0.5]), probs, 1.5, None, history, 0.05).tolist() == [False]
    margin = redundancy_margin("auto", 10)
    assert select_samples(torch.tensor([0.5]), probs, 1.5, None, history, margin).tolist() == [True]


@pytest.mark.parametrize("bad", ["sometimes", 1.5, -0.1])
def test_cema_rejects_bad_redundancy_margin(bad: object) -> None:
    with pytest.raises(ValueError, match="d_margin"):
        create_adapter("cema", {"d_margin": bad})


def test_cema_weighted_entropy_and_distillation_loss() -> None:
    uniform = torch.zeros(1, 2)
    # E_max = ln 2: weight exp(E_max - H) = 1 for a uniform prediction
    assert float(weighted_entropy(uniform, LN2)) == pytest.approx(LN2)
    loss, parts = distillation_loss(uniform, uniform, LN2, 1.0, 1.0, 1.0, 1.0)
    assert parts == pytest.approx({"loss_ent": LN2, "loss_kl": 0.0, "loss_ce": LN2})
    assert float(loss) == pytest.approx(2 * LN2)

    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = [0.75, 0.25]
    h_t = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    w = math.exp(1.0 - h_t)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss, parts = distillation_loss(uniform, teacher, 1.0, 3.0, 3.0, 1.0, 1.0)
    assert parts["loss_ent"] == pytest.approx(LN2 * math.exp(1.0 - LN2))
    assert parts["loss_kl"] == pytest.approx(w * kl)
    assert parts["loss_ce"] == pytest.approx(w * LN2)
    assert float(loss) == pytest.approx(3 * parts["loss_ent"] + 3 * parts["loss_kl"] + parts["loss_ce"])
    # temperature T scales the KL term by T^2 and softens both distributions
    _, soft = distillation_loss(uniform, teacher, 1.0, 1.0, 1.0, 1.0, 2.0)
    pt = torch.softmax(teacher / 2, dim=1)[0]
    kl_t = float((pt * (pt / 0.5).log()).sum())
    assert soft["loss_kl"] == pytest.approx(w * 4 * kl_t)


def test_cema_threshold_freezes_its_reference_after_warm_up() -> None:
    adapter = create_adapter("cema", {"warm_up_samples": 4, "ent_low_margin": None, "d_margin": None})
    model = adapter.prepare(_tiny_gn())
    state = adapter.init_state(model)
    gen = torch.Generator().manual_seed(0)
    first = adapter.step(model, torch.randn(2, 3, 4, 4, generator=gen), state)
    assert first.info.extra["threshold"] == pytest.approx(0.4 * math.log(5))  # before warm-up: static
    assert math.isnan(float(first.state.tensors["filter/entropy_at_warmup"]))
    second = adapter.step(model, torch.randn(2, 3, 4, 4, generator=gen), first.state)
    ref = float(second.state.tensors["filter/entropy_at_warmup"])
    assert ref == pytest.approx(float(second.state.tensors["filter/entropy_sum"]) / 4)
    third = adapter.step(model, torch.randn(2, 3, 4, 4, generator=gen) * 3, second.state)
    avg_now = float(third.state.tensors["filter/entropy_sum"]) / 6
    assert third.info.extra["threshold"] == pytest.approx(0.4 * math.log(5) * avg_now / ref)


# -- replay buffer --------------------------------------------------------------------------------


def test_quantization_recovers_uint8_images() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 5, 5), generator=gen, dtype=torch.uint8)
    images[:, :, 0, 0], images[:, :, 0, 1] = 0, 255  # full range: exact recovery
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    x = (images.float() / 255 - mean) / std
    codes, scale, offset = replay.quantize(x)
    assert codes.dtype == torch.uint8 and scale.shape == (3, 3)
    assert torch.equal(codes, images)
    close(replay.dequantize(codes, scale, offset), x, atol=1e-5)
    partial = x[:, :, 1:, 1:]  # narrower range: error below half a quantization step
    back = replay.dequantize(*replay.quantize(partial))
    assert float((back - partial).abs().max()) <= 0.5 / (255 * 0.2) + 1e-6


def test_replay_fifo_chunks() -> None:
    def samples(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = torch.arange(start, start + n, dtype=torch.uint8)
        return values[:, None, None, None].expand(n, 1, 1, 1).clone(), torch.ones(n, 1), torch.zeros(n, 1)

    store: dict[str, torch.Tensor] = {"other": torch.zeros(1)}
    for start in range(0, 10, 2):
        store = replay.append(store, "h/", *samples(start, 2), capacity=7, chunk_size=3)
    assert replay.size(store, "h/") == 7
    assert "other" in store
    codes, _, _ = replay.take(store, "h/", torch.arange(7))
    assert codes.flatten().tolist() == [3, 4, 5, 6, 7, 8, 9]  # oldest evicted first
    codes, _, _ = replay.take(store, "h/", torch.tensor([6, 0, 3]))
    assert codes.flatten().tolist() == [9, 3, 6]  # the order of the indices is kept
    rest, (popped, _, _) = replay.pop_front(store, "h/", 4)
    assert popped.flatten().tolist() == [3, 4, 5, 6]
    assert replay.take(rest, "h/", torch.arange(3))[0].flatten().tolist() == [7, 8, 9]
    assert replay.size(store, "h/") == 7  # the input dict was not changed


# -- fused multi-stream steps: segment reductions ---------------------------------------------------


def test_segment_moments_equal_each_segments_own_moments() -> None:
    from adapters.functional import var_mean
    from adapters.segments import FusedBatch, segment_moments

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 3, 4, 5, generator=gen) * (1 + n) + n for n in (2, 1, 3)]
    batch = FusedBatch.of(xs)
    var, mean, count = segment_moments(batch.x, batch.index, batch.sizes)
    for i, x in enumerate(xs):
        want_var, want_mean = var_mean(x, [0, 2, 3])
        close(mean[i], want_mean, atol=1e-5)
        close(var[i], want_var, atol=1e-4)
        assert float(count[i]) == len(x) * 20


def test_segment_sums_keep_a_broken_segment_to_itself() -> None:
    from adapters.segments import segment_sum

    values = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [3.0, 4.0]])
    sums = segment_sum(values, torch.tensor([0, 1, 0]), 2)
    close(sums[0], [4.0, 6.0])
    assert torch.isnan(sums[1, 0])


@pytest.mark.parametrize("lengths", [(2, 1, 3), (1, 1, 1, 1)])
def test_unmix_segment_update_and_mix_equal_one_stream_at_a_time(lengths: tuple[int, ...]) -> None:
    """Segments of several samples, and one sample per segment (the per-stream ``lerp`` update)."""
    from adapters.unmix_tns import update_segment_components

    gen = torch.Generator().manual_seed(1)
    k, c = 3, 4
    means = torch.randn(len(lengths), k, c, generator=gen)
    variances = torch.rand(len(lengths), k, c, generator=gen) + 0.5
    inst_mean = torch.randn(sum(lengths), c, generator=gen)
    inst_var = torch.rand(sum(lengths), c, generator=gen)
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    sizes = torch.tensor(lengths, dtype=torch.float32)
    momentum = 1 - (1 - 0.1) ** (sizes / 4)
    p = assignment(inst_mean, means[index], 0.5)
    mean, var = mixed_statistics(p, inst_mean, inst_var, means[index], variances[index])
    new_means, new_vars = update_segment_components(p, inst_mean, inst_var, means, variances, momentum, index, sizes)
    start = 0
    for s, n in enumerate(lengths):
        rows = slice(start, start + n)
        p_s = assignment(inst_mean[rows], means[s], 0.5)
        close(p[rows], p_s)
        m_s, v_s = mixed_statistics(p_s, inst_mean[rows], inst_var[rows], means[s], variances[s])
        close(mean[rows], m_s, atol=1e-5)
        close(var[rows], v_s, atol=1e-5)
        u_m, u_v = update_components(p_s, inst_mean[rows], inst_var[rows], means[s], variances[s], momentum[s])
        close(new_means[s], u_m, atol=1e-6)
        close(new_vars[s], u_v, atol=1e-6)
        start += n
