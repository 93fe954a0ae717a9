"""The stream service: every stream operation, between the HTTP routes and the engine.

Routes parse a request, call one method here and shape the answer; they never touch the
store, the batcher or the model worker themselves. This class owns the sequence of each
operation and two rules that every route used to have to remember:

- **Nothing blocks the event loop.** Every state-store call runs in the service's own thread
  pool (never the model worker, which may be busy for a whole batch, and never the event
  loop, which must keep answering ``/healthz`` while Redis hangs). Torch work runs on the
  model worker thread through the batcher.
- **The registration is read once per request.** The record read here travels with the
  request to the worker (``Batcher.submit`` carries it), which never reads it again.

Errors are the store's, the adapters' and the service's own (:mod:`tta_server.errors`); the
app maps them to HTTP in one place.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, TypeVar

import numpy as np

from tta_server.errors import DeadlineExceededError, QueueFullError
from tta_server.metrics import Metrics
from tta_server.models import ModelHub
from tta_server.observability.tracing import span
from tta_server.serving.batcher import Batcher
from tta_server.serving.drift import DriftSummary, DriftTracker, WindowSummary
from tta_server.serving.model_worker import BatchOutput, ModelWorker
from tta_server.state.base import StateStore, StateSummary, StreamKey, StreamRecord
from tta_server.zoo.catalogue import ModelSpec

T = TypeVar("T")

STORE_THREADS = 16
"""Store calls in flight at once; Redis calls that hang before the circuit opens wait here."""


@dataclass(frozen=True)
class NewStream:
    """What a client asks to register (already schema-validated)."""

    model: str
    method: str
    config: Mapping[str, Any]
    seed: int
    metadata: dict[str, str]
    stream_id: str | None = None


@dataclass(frozen=True)
class StreamView:
    """A stream as a description shows it: registration, state summary, optional short drift window."""

    record: StreamRecord
    summary: StateSummary | None
    drift: WindowSummary | None
    model_sha256: str | None = None


class PredictInput(NamedTuple):
    """A decoded predict body: uint8 NHWC images and the options the body itself carried."""

    images: np.ndarray
    adapt: bool | None = None
    top_k: int | None = None


class PredictOutcome(NamedTuple):
    """One request's share of a batch: the batch output, its rows, and the options that applied."""

    record: StreamRecord
    output: BatchOutput
    rows: slice
    top_k: int


Decoder = Callable[[ModelSpec], Awaitable[PredictInput]]
"""Turns the request body into images for a model's input spec (decoding needs the stream's model)."""


class StreamService:
    """Owns every stream operation: create, get, list, delete, reset, predict, export, import, parameters, drift."""

    def __init__(
        self,
        hub: ModelHub,
        store: StateStore,
        worker: ModelWorker,
        batcher: Batcher[BatchOutput],
        drift: DriftTracker,
        metrics: Metrics,
    ) -> None:
        self.hub = hub
        self.store = store
        self.worker = worker
        self.batcher = batcher
        self.drift = drift
        self.metrics = metrics
        self._store_pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="tta-store")

    def close(self) -> None:
        """Stop the store threads (after the batcher stopped) and close the store."""
        self._store_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call off the event loop, in the store pool."""
        call = partial(contextvars.copy_context().run, fn, *args)  # the request's id reaches store log lines
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, call)

    async def record(self, key: StreamKey) -> StreamRecord:
        """The registration of ``key`` (404 if absent); one store call.

        Read inline when the store is in-process (a dictionary lookup under a lock held for
        microseconds): the store pool's thread hop cost more CPU than the lookup, on every request.
        """
        if self.store.in_process:
            return self.store.get_stream(key)
        return await self._store(self.store.get_stream, key)

    def _num_classes(self, record: StreamRecord) -> int:
        return len(self.hub.catalogue.get(record.model).classes)

    def _view(self, record: StreamRecord, summary: StateSummary | None, with_drift: bool) -> StreamView:
        """A description: registration, state summary, the model's weights hash and (optionally) recent drift."""
        drift = self.drift.summary(record.key, self._num_classes(record)).short if with_drift else None
        return StreamView(record, summary, drift, self.hub.loaded_sha256(record.model))

    # -- registry -------------------------------------------------------------------------
    async def create(self, tenant: str, new: NewStream) -> StreamView:
        """Validate model, method and config on the worker (it may load the model), then register."""
        config = await self.batcher.run_in_worker(lambda: self.worker.validate(new.model, new.method, new.config))
        record = StreamRecord(
            key=StreamKey(tenant, new.stream_id or uuid.uuid4().hex[:16]),
            model=new.model,
            method=new.method,
            config=config,
            seed=new.seed,
            metadata=new.metadata,
            created_at=time.time(),
        )
        await self._store(self.store.create_stream, record)
        return self._view(record, None, with_drift=True)

    async def get(self, key: StreamKey) -> StreamView:
        record = await self.record(key)
        summaries = await self._store(self.store.state_summaries, [key])
        return self._view(record, summaries.get(key), with_drift=True)

    async def list(self, tenant: str | None, offset: int, limit: int) -> tuple[list[StreamView], int]:
        """A page of streams (every tenant's when ``tenant`` is None) and the total count."""

        def page() -> tuple[list[StreamRecord], dict[StreamKey, StateSummary], int]:
            records, total = self.store.list_streams(tenant, offset, limit)
            return records, self.store.state_summaries([r.key for r in records]), total

        records, summaries, total = await self._store(page)
        return [self._view(r, summaries.get(r.key), with_drift=False) for r in records], total

    async def delete(self, key: StreamKey) -> None:
        await self._store(self.store.delete_stream, key)
        self.drift.forget(key)

    def active_streams(self) -> int:
        """Registered streams; the store answers from memory, never waiting for its backend."""
        return self.store.count()

    async def check_store(self) -> None:
        """Return when the store answers; raise ``StoreUnavailableError`` otherwise (off the loop)."""
        await self._store(self.store.ping)

    # -- the hot path ---------------------------------------------------------------------
    async def predict(self, key: StreamKey, decode: Decoder, adapt: bool, top_k: int) -> PredictOutcome:
        """Admit, decode for the stream's model, queue, and wait for the batch that serves this request.

        A queue slot is reserved before decoding (429 at once when none is free) and held until the
        request is queued. Options in the body (JSON ``adapt``/``top_k``) win over the query's.
        """
        record = await self.record(key)
        try:
            ticket = self.batcher.admit()  # a full queue refuses before the body is decoded
        except QueueFullError:
            self.metrics.queue_rejections.inc()
            raise
        try:
            with span("tta.decode"):
                body = await decode(self.hub.catalogue.get(record.model))
            adapt = body.adapt if body.adapt is not None else adapt
            output, rows = await self.batcher.submit(record, body.images, adapt, ticket)
        except QueueFullError:
            self.metrics.queue_rejections.inc()
            raise
        except DeadlineExceededError:
            self.metrics.deadline_exceeded.inc()
            raise
        finally:
            self.batcher.release(ticket)
        return PredictOutcome(record, output, rows, body.top_k or top_k)

    # -- state management -----------------------------------------------------------------
    async def reset(self, key: StreamKey) -> tuple[int, int]:
        """Back to source; returns (step, new version)."""
        record = await self.record(key)
        step, version = await self.batcher.run_in_worker(lambda: self.worker.reset(record))
        self.metrics.resets.labels(record.model, record.method, "api").inc()
        return step, version

    async def export_state(self, key: StreamKey) -> tuple[bytes, int]:
        """The state as safetensors bytes and its version."""
        record = await self.record(key)
        return await self.batcher.run_in_worker(lambda: self.worker.export_state(record))

    async def export_parameters(self, key: StreamKey) -> tuple[bytes, int]:
        """The adapted tensors under the model's own names and their version."""
        record = await self.record(key)
        return await self.batcher.run_in_worker(lambda: self.worker.export_parameters(record))

    async def import_state(self, key: StreamKey, read_blob: Callable[[], Awaitable[bytes]]) -> tuple[int, int]:
        """Replace the state with the body's safetensors bytes, once they are shown to fit; (step, version)."""
        record = await self.record(key)
        blob = await read_blob()
        return await self.batcher.run_in_worker(lambda: self.worker.import_state(record, blob))

    async def drift_of(self, key: StreamKey) -> DriftSummary:
        record = await self.record(key)
        return self.drift.summary(record.key, self._num_classes(record))
