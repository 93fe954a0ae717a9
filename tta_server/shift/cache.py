"""Corrupted copies of a dataset, generated once and kept on disk as memory-mappable .npy files.

Generating a corruption of 10,000 images takes seconds; a benchmark sweep asks for the same
(corruption, severity, seed) set dozens of times (every method, setting and batch size), so
each set is written once under the cache directory (``$TTA_CACHE_DIR`` or
``~/.cache/tta-server``, never inside the git checkout) and read back memory-mapped: the
``mixed`` stream draws from all 15 sets without holding them in memory.

The file name is the key: a fingerprint of the source images and labels, the corruption,
the severity, the seed and :data:`~tta_server.shift.corruptions.CORRUPTION_VERSION`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np

from tta_server.data.datasets import LabeledImages, default_cache_dir
from tta_server.shift.corruptions import CORRUPTION_VERSION, Domain, corrupt

logger = logging.getLogger(__name__)


def dataset_fingerprint(data: LabeledImages) -> str:
    """A short hash of the images and labels: the same pixels give the same key from any path."""
    digest = hashlib.sha256()
    digest.update(repr(data.x.shape).encode())
    digest.update(np.ascontiguousarray(data.x).data)
    digest.update(np.ascontiguousarray(data.y, dtype=np.int64).data)
    return digest.hexdigest()[:16]


class CorruptedSets:
    """Per-domain corrupted versions of one source dataset, cached as .npy files.

    ``cache_dir=None`` uses the default cache directory; ``persistent=False`` uses a
    temporary directory removed by :meth:`close` (still on disk, so ``mixed`` streams stay
    memory-mapped). Use as a context manager.
    """

    def __init__(
        self,
        source: LabeledImages,
        seed: int,
        cache_dir: Path | None = None,
        persistent: bool = True,
    ) -> None:
        self.source = source
        self.seed = seed
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if persistent:
            self.root = (cache_dir or default_cache_dir()) / "corruptions"
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="tta-corruptions-", dir=cache_dir)
            self.root = Path(self._tmp.name)
        self.fingerprint = dataset_fingerprint(source)
        self.generated: list[Domain] = []
        """Domains this object had to generate (the others came from the cache)."""

    def path(self, domain: Domain) -> Path:
        """Where the corrupted set of ``domain`` is (or will be) cached."""
        name = f"{self.fingerprint}-{domain.corruption}-s{domain.severity}-seed{self.seed}-v{CORRUPTION_VERSION}.npy"
        return self.root / name

    def images(self, domain: Domain) -> np.ndarray:
        """The images of ``domain`` (``N x H x W x 3`` uint8), memory-mapped read-only from the cache.

        Clean images are the source array itself. A cached file of the wrong shape (an
        interrupted or foreign write) is regenerated.
        """
        domain.check()
        if domain.is_clean:
            return self.source.x
        path = self.path(domain)
        if path.exists():
            try:
                cached: np.ndarray = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                logger.warning("unreadable cached set %s (%s); regenerating", path, exc)
            else:
                if cached.shape == self.source.x.shape and cached.dtype == np.uint8:
                    return cached
                logger.warning(
                    "cached set %s has shape %s, expected %s; regenerating", path, cached.shape, self.source.x.shape
                )
        self._generate(domain, path)
        loaded: np.ndarray = np.load(path, mmap_mode="r")
        return loaded

    def _generate(self, domain: Domain, path: Path) -> None:
        logger.info("generating %s for %d images (seed %d)", domain.name, len(self.source), self.seed)
        data = corrupt(self.source.x, domain.corruption, domain.severity, self.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, data)
        tmp.replace(path)
        self.generated.append(domain)

    def close(self) -> None:
        """Remove the temporary directory of a non-persistent cache."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> CorruptedSets:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
