"""Registry and config validation: names are unique, unknown names and bad configs fail clearly."""

from __future__ import annotations

import typing

import annotated_types
import pytest
from pydantic.fields import FieldInfo

import adapters
from adapters import registry
from adapters.errors import DuplicateMethodError, InvalidConfigError, UnknownMethodError
from adapters.registry import create_adapter, method_class
from adapters.source import Source


def test_duplicate_names_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Again(Source):
        name = "source"

    with pytest.raises(DuplicateMethodError, match="source"):
        registry.register(Again)
    assert registry.method_class("source") is Source


def test_unknown_names_raise() -> None:
    with pytest.raises(UnknownMethodError, match="no-such-method"):
        create_adapter("no-such-method")
    with pytest.raises(KeyError):  # UnknownMethodError is also a KeyError for dict-like callers
        method_class("no-such-method")


@pytest.mark.parametrize(
    ("name", "config", "field"),
    [
        ("alpha_bn", {"source_weight": 1.5}, "source_weight"),
        ("unmix_tns", {"num_components": 0}, "num_components"),
        ("sar", {"rho": -1.0}, "rho"),
        ("tent", {"optimizer": "rmsprop"}, "optimizer"),
        ("cema", {"cloud_batch_size": 0}, "cloud_batch_size"),
        ("adab2n", {"kappa": 2.0}, "kappa"),
        ("bn", {"unknown_option": 1}, "unknown_option"),
    ],
)
def test_invalid_config_names_the_field(name: str, config: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        create_adapter(name, config)
    assert field in str(info.value)
    assert info.value.method == name
    assert any(field in [str(p) for p in e["loc"]] for e in info.value.errors)


def _constraints(info: FieldInfo) -> list[object]:
    """The field's own constraints plus those of ``Annotated`` members of a union annotation."""
    found = list(info.metadata)
    for member in typing.get_args(info.annotation):
        if typing.get_origin(member) is typing.Annotated:
            for meta in member.__metadata__:
                found.extend(meta.metadata if isinstance(meta, FieldInfo) else [meta])
    return found


def _bounded(info: FieldInfo) -> tuple[bool, bool]:
    constraints = _constraints(info)
    lower = any(isinstance(m, (annotated_types.Ge, annotated_types.Gt)) for m in constraints)
    upper = any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in constraints)
    return lower, upper


@pytest.mark.parametrize("name", adapters.method_names())
def test_every_numeric_field_is_bounded(name: str) -> None:
    config_cls = method_class(name).config_cls
    for field_name, info in config_cls.model_fields.items():
        annotation = str(info.annotation)
        if "int" in annotation or "float" in annotation:
            assert _bounded(info) == (True, True), f"{name}.{field_name} needs ge/gt and le/lt bounds"
        elif "str" in annotation:
            assert info.metadata, f"{name}.{field_name} needs a length bound"


def test_configs_are_immutable_and_strict() -> None:
    adapter = create_adapter("alpha_bn")
    with pytest.raises(ValueError, match="frozen"):
        adapter.config.source_weight = 0.5


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alpha_bn", {"source_weight": 0.9}),
        ("unmix_tns", {"num_components": 16, "temperature": 0.07, "alpha_init": 0.5, "batch_size_max": 64}),
        ("tent", {"optimizer": "adam", "lr": 1e-3, "steps": 1}),
        (
            "sar",
            {"lr": 0.00025, "momentum": 0.9, "rho": 0.05, "margin_e0": 0.4, "ema_factor": 0.9, "freeze": "last_stage"},
        ),
        (
            "cema",
            {
                "ent_high_margin": 0.4,
                "ent_low_margin": 0.02,
                "ent_high_margin_coeff": 1.0,
                "d_margin": "auto",  # 0.05 at C = 1000, see test_adapter_math
                "cloud_batch_size": 32,
                "replay_buffer_size": 10_000,
                "alpha": 3.0,
                "beta": 3.0,
                "gamma": 1.0,
                "temperature": 1.0,
                "teacher_lr": 2.5e-4,
                "edge_lr": 2.5e-3,
            },
        ),
        ("adab2n", {"momentum": 0.1, "source_prior_batches": None, "normalize": "updated"}),
    ],
)
def test_defaults_follow_the_spec(name: str, expected: dict[str, object]) -> None:
    config = create_adapter(name).config.model_dump()
    assert {k: config[k] for k in expected} == expected


def test_sar_reset_margin_is_the_reference_value_at_imagenet_scale() -> None:
    """e_m = 0.2 nats at C = 1000, expressed relative to ln C."""
    import math

    margin = create_adapter("sar").config.model_dump()["reset_margin"]
    assert margin * math.log(1000) == pytest.approx(0.2, abs=1e-3)
