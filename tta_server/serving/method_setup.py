"""One way to set up a method on a model: the server and ``tta-server eval`` both go through here.

Why one function: a stream served over HTTP and the same stream replayed by the evaluation
harness must see the same prepared model, the same auxiliary models bound in the same order
and the same pixels. Two copies of this sequence drifted apart before; the HTTP == eval test
proves the server and the harness agree, and it can only keep proving it if both call this.

The order matters: auxiliary models (CEMA's teacher) are prepared and bound first, because a
method may check the main model against them; then the main model is checked and prepared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from adapters import create_adapter
from adapters.base import Adapter
from tta_server.zoo.catalogue import LoadedModel, ModelSpec
from tta_server.zoo.transforms import normalize, to_tensor_batch

M = TypeVar("M")

PrepareFn = Callable[[LoadedModel, Adapter[Any]], nn.Module]
"""Turns a loaded model into ``adapter.prepare``'s result (a private copy, or a cached one)."""


def prepare_copy(loaded: LoadedModel, adapter: Adapter[Any]) -> nn.Module:
    """``adapter.prepare`` on a deep copy, so the loaded model stays untouched and shareable."""
    return adapter.prepare(copy.deepcopy(loaded.model))


@dataclass(frozen=True)
class MethodSetup:
    """A method bound to its prepared model(s), ready to step streams of one model."""

    loaded: LoadedModel
    adapter: Adapter[Any]
    model: nn.Module
    auxiliary: dict[str, LoadedModel]

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec


def prepare_for_method(
    adapter: Adapter[Any],
    model: M,
    auxiliary: Mapping[str, M],
    prepare: Callable[[M], nn.Module],
    module_of: Callable[[M], nn.Module],
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The one binding sequence: prepare and bind the auxiliary models, check the model, prepare it.

    Generic over how a model is held (a catalogue :class:`LoadedModel`, or a bare module in the
    cost benchmark); ``module_of`` reaches the module that ``check_model`` inspects.
    """
    prepared_aux = {role: prepare(aux) for role, aux in auxiliary.items()}
    if prepared_aux:
        adapter.bind_auxiliary(prepared_aux)
    adapter.check_model(module_of(model))
    return prepare(model), prepared_aux


def setup_method(
    loaded: LoadedModel,
    method: str,
    config: Mapping[str, Any],
    load_model: Callable[[str], LoadedModel],
    prepare: PrepareFn = prepare_copy,
) -> MethodSetup:
    """Create the adapter for ``method``/``config``, bind its auxiliary models, check and prepare ``loaded``.

    ``load_model(name)`` resolves the auxiliary model names the method asks for (the catalogue);
    ``prepare`` lets the server share one prepared copy per (model, method) between streams.
    Raises the adapter's errors (invalid config, unsupported model, missing auxiliary model).
    """
    adapter = create_adapter(method, config)
    auxiliary = {role: load_model(name) for role, name in adapter.auxiliary_models().items()}
    model, _ = prepare_for_method(adapter, loaded, auxiliary, lambda m: prepare(m, adapter), lambda m: m.model)
    return MethodSetup(loaded, adapter, model, auxiliary)


def model_inputs(images: np.ndarray, spec: ModelSpec, device: str) -> torch.Tensor:
    """uint8 NHWC images -> the model's normalized NCHW input on ``device``.

    The uint8 batch is 4x smaller than the float input, so it is what crosses to a GPU (through
    pinned memory, asynchronously); the conversion and normalization then run on the device.
    """
    batch = to_tensor_batch(images)
    if device.startswith("cuda"):
        batch = batch.contiguous().pin_memory().to(device, non_blocking=True)
    elif device != "cpu":
        batch = batch.to(device)
    return normalize(batch, spec.mean, spec.std, spec.input_size)
