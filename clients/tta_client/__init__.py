"""Python client for tta-server: sync and async clients, typed answers, the API's errors.

Depends on httpx and pydantic only (never torch, never the server package), so it installs
anywhere a camera gateway runs Python. The ``tta-client`` command line (``replay``, ``load``)
needs the ``cli`` extra (numpy, pillow, rich) and, for plots, ``plot`` (matplotlib).
"""

from tta_client._version import __version__
from tta_client.aio import AsyncTTAClient
from tta_client.client import TTAClient
from tta_client.errors import (
    BadRequest,
    ClientTimeout,
    Conflict,
    ConnectFailed,
    DeadlineExceeded,
    Invalid,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    ServerError,
    ServiceUnavailable,
    StoreUnavailable,
    TransportError,
    TTAClientError,
    Unauthorized,
    UnsupportedMedia,
)
from tta_client.images import ImageInputError
from tta_client.retry import RetryPolicy
from tta_client.types import (
    Drift,
    Health,
    MethodInfo,
    ModelInfo,
    ParametersExport,
    Prediction,
    PredictResult,
    Readiness,
    ResetResult,
    StateExport,
    StateImported,
    Stream,
    StreamPage,
    TopK,
    Window,
)

__all__ = [
    "AsyncTTAClient",
    "BadRequest",
    "ClientTimeout",
    "Conflict",
    "ConnectFailed",
    "DeadlineExceeded",
    "Drift",
    "Health",
    "ImageInputError",
    "Invalid",
    "MethodInfo",
    "MethodNotAllowed",
    "ModelInfo",
    "NotFound",
    "NotReady",
    "ParametersExport",
    "PayloadTooLarge",
    "PredictResult",
    "Prediction",
    "QueueFull",
    "Readiness",
    "ResetResult",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "StateExport",
    "StateImported",
    "StoreUnavailable",
    "Stream",
    "StreamPage",
    "TTAClient",
    "TTAClientError",
    "TopK",
    "TransportError",
    "Unauthorized",
    "UnsupportedMedia",
    "Window",
    "__version__",
]
