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
import json
from collections.abc import Callable, Mapping, Sequence
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


def setup_key(model: str, method: str, config: Mapping[str, Any]) -> tuple[str, str, str]:
    """What makes two setups the same: model, method and config (as canonical JSON). Streams with one key
    share one prepared model and adapter, so one ``adapter.step_many`` call can serve them together."""
    return model, method, json.dumps(config, sort_keys=True)


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


def model_inputs(
    images: np.ndarray | Sequence[np.ndarray], spec: ModelSpec, device: str, channels_last: bool = True
) -> torch.Tensor:
    """uint8 NHWC images (one array, or a fused batch's segments in order) -> normalized NCHW on ``device``.

    The uint8 batch is 4x smaller than the float input, so it is what crosses to a GPU: the
    segments are copied once, straight into one pinned staging buffer, which crosses in ONE
    non-blocking copy (no per-stream transfer, no host sync); the conversion and normalization
    then run on the device. On the CPU the segments are concatenated once.

    ``channels_last`` (the setting of that name, default on) hands the model an NHWC-strided
    input, which the convolutions keep: ResNet-20 on one CPU thread ran 1.33x faster at batch 64
    than with a contiguous NCHW input (docs/operations.md), and tensor-core GPUs prefer it too.
    The permuted uint8 batch already has those strides, so on costs no copy; off makes the input
    NCHW-contiguous.
    """
    parts = [images] if isinstance(images, np.ndarray) else list(images)
    if device.startswith("cuda"):
        staging = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
        np.concatenate(parts, out=staging.numpy())
        batch = to_tensor_batch(staging.to(device, non_blocking=True))
    else:
        batch = to_tensor_batch(parts[0] if len(parts) == 1 else np.concatenate(parts))
        if device != "cpu":
            batch = batch.to(device)
    x = normalize(batch, spec.mean, spec.std, spec.input_size)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
