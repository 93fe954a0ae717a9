"""Turning what a caller has (arrays, files, encoded bytes) into a predict request body.

Arrays travel as one ``.npy`` batch (``application/x-npy``): no lossy re-encoding and no
decode cost on the server, which matters for replaying datasets whose pixels are the point
(a corruption benchmark). Files and encoded bytes travel as they are, as multipart parts
(or base64 JSON on request), so the server decodes exactly what the camera produced.

numpy is imported only when an array is actually passed: the client itself depends on
httpx and pydantic alone.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    ArrayLike: TypeAlias = npt.NDArray[np.uint8]
else:
    ArrayLike: TypeAlias = Any

EncodedImage: TypeAlias = bytes | str | os.PathLike[str]
"""Encoded image bytes, or the path of an image file."""

Images: TypeAlias = "ArrayLike | EncodedImage | Sequence[ArrayLike] | Sequence[EncodedImage]"
"""What ``predict`` accepts: a uint8 array (one HxWx3 image or an NxHxWx3 batch), a list of
arrays of one shape, one encoded image or path, or a list of them."""

Encoding: TypeAlias = Literal["multipart", "json"]

NPY_MEDIA_TYPE = "application/x-npy"


class ImageInputError(ValueError):
    """The images cannot be sent as given (wrong dtype or shape, mixed kinds, empty)."""


@dataclass(frozen=True)
class Body:
    """A ready request body: exactly one of ``content``, ``files`` or ``json`` is set."""

    count: int
    content: bytes | None = None
    headers: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    json: dict[str, Any] | None = None


def _is_array(value: object) -> bool:
    """Duck-typed so that plain Python values never import numpy."""
    return hasattr(value, "__array_interface__") and hasattr(value, "dtype") and hasattr(value, "shape")


def npy_bytes(array: ArrayLike) -> bytes:
    """One uint8 array as ``.npy`` bytes (never pickled)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def as_batch(images: ArrayLike | Sequence[ArrayLike]) -> ArrayLike:
    """A uint8 ``N x H x W x 3`` (or ``N x H x W`` grey) batch from one image, a batch or a list.

    A 3-D array whose last axis is 3 is one RGB image; any other 3-D array is a batch of grey
    images; a 2-D array is one grey image.
    """
    import numpy as np

    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError("no images given")
        shapes = {tuple(a.shape) for a in images}
        if len(shapes) != 1:
            raise ImageInputError(f"arrays in one request must share a shape, got {sorted(shapes)}")
        array = np.stack([np.asarray(a) for a in images])
    else:
        array = np.asarray(images)
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3):
            array = array[None]
    if array.dtype != np.uint8:
        raise ImageInputError(f"arrays must be uint8 (0-255 pixels), got {array.dtype}; convert with .astype('uint8')")
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3) or array.shape[0] == 0:
        raise ImageInputError(f"expected H x W x 3, N x H x W x 3 or N x H x W uint8, got shape {array.shape}")
    return array


def guess_media_type(blob: bytes) -> str:
    """The image type from its magic bytes (the server checks again; this only labels the part)."""
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if blob.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _read(item: EncodedImage, index: int) -> tuple[str, bytes]:
    if isinstance(item, bytes):
        return f"image-{index}", item
    path = Path(item)
    try:
        return path.name, path.read_bytes()
    except OSError as exc:
        raise ImageInputError(f"cannot read image file {path}: {exc.strerror or exc}") from None


def encode_images(images: Images, encoding: Encoding = "multipart") -> Body:
    """The request body for ``images``: arrays as ``.npy``, files and bytes as multipart or JSON."""
    items: Sequence[object]
    if isinstance(images, (bytes, str, os.PathLike)) or _is_array(images):
        items = [images]
    elif isinstance(images, Sequence):
        items = images
    else:
        raise ImageInputError(f"cannot send {type(images).__name__} as images")
    if not items:
        raise ImageInputError("no images given")
    if all(_is_array(i) for i in items):
        batch = as_batch(cast("ArrayLike | Sequence[ArrayLike]", images))
        return Body(count=int(batch.shape[0]), content=npy_bytes(batch), headers={"content-type": NPY_MEDIA_TYPE})
    if any(_is_array(i) for i in items):
        raise ImageInputError("do not mix arrays with files or encoded bytes in one request")
    if not all(isinstance(i, (bytes, str, os.PathLike)) for i in items):
        kinds = sorted({type(i).__name__ for i in items})
        raise ImageInputError(f"images must be arrays, bytes or file paths, got {kinds}")
    named = [_read(i, n) for n, i in enumerate(items)]  # type: ignore[arg-type]
    if encoding == "json":
        return Body(count=len(named), json={"images": [base64.b64encode(b).decode("ascii") for _, b in named]})
    files = [("images", (name, blob, guess_media_type(blob))) for name, blob in named]
    return Body(count=len(named), files=files)
