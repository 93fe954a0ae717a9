"""The 15 CIFAR-10-C corruptions: shapes, determinism, severity ordering, reference equivalences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tta_server.data.datasets import load_labeled_images
from tta_server.shift import corruptions as C
from tta_server.shift.cache import CorruptedSets
from tta_server.shift.corruptions import (
    CORRUPTIONS,
    RANDOM_CORRUPTIONS,
    SEVERITIES,
    CorruptionError,
    Domain,
    corrupt,
)
from tta_server.shift.primitives import clipped_zoom, motion_blur, plasma_fractal, to_uint8, to_unit

# Severity steps whose images are not further from clean (mean absolute difference) than the
# previous severity's, because the CIFAR-10-C table is not monotone in that measure: glass blur's
# pixel scrambling is the same at severities 1-3 (only the blur sigma grows, which smooths the
# scrambled pixels back) and severity 5 differs from 4 by sigma only; motion blur 3 -> 4 extends
# the kernel where its Gaussian weights are already negligible; frost lowers the image weight
# while the (random) texture weight stays. Elastic transform is exempt altogether: its table
# trades a large affine jitter (severity 1) for small local displacements (severity 5), so the
# pixel distance falls while the deformation becomes less regular.
NOT_MONOTONE = {
    ("glass_blur", 2),
    ("glass_blur", 3),
    ("glass_blur", 5),
    ("motion_blur", 4),
    ("frost", 4),
    ("frost", 5),
}
NOT_ORDERED = {"elastic_transform"}


@pytest.fixture(scope="module")
def images(shared_dir: Path) -> np.ndarray:
    """48 lossless CIFAR-10 test images."""
    return load_labeled_images(shared_dir / "data" / "cifar10_test_first846.npz").x[:48]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_determinism(images: np.ndarray, name: str) -> None:
    out = corrupt(images, name, 3, seed=1)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.array_equal(out, corrupt(images, name, 3, seed=1))
    assert not np.array_equal(out, images)
    if name in RANDOM_CORRUPTIONS:
        assert not np.array_equal(out, corrupt(images, name, 3, seed=2))
    else:
        assert np.array_equal(out, corrupt(images, name, 3, seed=2))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_distance_from_clean_grows_with_severity(images: np.ndarray, name: str) -> None:
    clean = images.astype(np.float64)
    dist = [float(np.abs(corrupt(images, name, s, seed=0) - clean).mean()) for s in SEVERITIES]
    if name in NOT_ORDERED:
        assert len(set(dist)) == len(dist), (name, dist)
        return
    for severity in SEVERITIES[1:]:
        if (name, severity) not in NOT_MONOTONE:
            assert dist[severity - 1] > dist[severity - 2], (name, dist)
    assert dist[-1] > dist[0], (name, dist)


def test_batch_of_one_and_other_sizes(images: np.ndarray) -> None:
    for name in CORRUPTIONS:
        assert corrupt(images[:1], name, 5).shape == (1, 32, 32, 3)
    big = np.repeat(np.repeat(images[:2], 2, axis=1), 2, axis=2)  # 64 x 64 images
    for name in CORRUPTIONS:
        assert corrupt(big, name, 2).shape == big.shape


def test_chunks_draw_from_their_own_seeded_generators(images: np.ndarray) -> None:
    """Chunk k is seeded by (seed, corruption, severity, k): a prefix of whole chunks is stable."""
    whole = corrupt(images, "gaussian_noise", 5, seed=3, chunk_size=16)
    assert np.array_equal(whole[:32], corrupt(images[:32], "gaussian_noise", 5, seed=3, chunk_size=16))
    noise = whole.astype(int) - images
    assert not np.array_equal(noise[:16], noise[16:32])
    assert not np.array_equal(whole, corrupt(images, "shot_noise", 5, seed=3, chunk_size=16))


def test_bad_arguments_are_named(images: np.ndarray) -> None:
    with pytest.raises(CorruptionError, match="unknown corruption 'rain'"):
        corrupt(images, "rain", 1)
    with pytest.raises(CorruptionError, match="severity"):
        corrupt(images, "fog", 6)
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt(images.astype(np.float32), "fog", 1)
    with pytest.raises(CorruptionError, match="severity 0"):
        Domain("none", 3).check()


def test_clean_endpoints_of_simple_corruptions(images: np.ndarray) -> None:
    """Contrast keeps each channel mean; brightness never darkens; impulse only writes 0 or 255."""
    out = corrupt(images, "contrast", 5).astype(np.float64)
    assert np.allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1.0)
    assert (corrupt(images, "brightness", 5).astype(int) >= images.astype(int) - 1).all()
    noisy = corrupt(images, "impulse_noise", 5)
    changed = noisy != images
    assert set(np.unique(noisy[changed])) <= {0, 255}
    assert 0.03 < changed.mean() < 0.08  # amount 0.07, minus values already at 0 or 255


def test_brightness_equals_hsv_round_trip(images: np.ndarray) -> None:
    color = pytest.importorskip("skimage.color")
    for severity in SEVERITIES:
        hsv = color.rgb2hsv(to_unit(images))
        hsv[..., 2] = np.clip(hsv[..., 2] + C.BRIGHTNESS[severity - 1], 0, 1)
        reference = to_uint8(color.hsv2rgb(hsv)).astype(int)
        assert np.abs(corrupt(images, "brightness", severity).astype(int) - reference).max() <= 1


def test_clipped_zoom_matches_scipy_zoom() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    for factor in (1.02, 1.13, 1.25, 1.75, 2.25):
        crop = int(np.ceil(32 / factor))
        top = (32 - crop) // 2
        for image, zoomed in zip(x, clipped_zoom(x, factor), strict=True):
            ref = ndimage.zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
            trim = (ref.shape[0] - 32) // 2
            assert np.allclose(zoomed, ref[trim : trim + 32, trim : trim + 32], atol=1e-5)


def test_motion_blur_streaks_along_the_angle() -> None:
    """A single bright pixel smears to the left for angle 0 (pixels sample to their right)."""
    x = np.zeros((1, 32, 32, 1), np.float32)
    x[0, 16, 16, 0] = 1.0
    out = motion_blur(x, radius=6, sigma=2.0, angles_deg=np.array([0.0]))[0, :, :, 0]
    assert np.isclose(out.sum(), 1.0, atol=1e-5)
    assert out[16, 16] > out[16, 14] > out[16, 12] > 0 and out[16, 17] == 0 and out[15].sum() == 0


def test_plasma_fractal_is_normalized_and_seeded() -> None:
    a = plasma_fractal(3, 32, 2.0, np.random.default_rng(0))
    assert a.shape == (3, 32, 32) and np.allclose(a.min(axis=(1, 2)), 0) and np.allclose(a.max(axis=(1, 2)), 1)
    assert np.array_equal(a, plasma_fractal(3, 32, 2.0, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(1, 24, 2.0, np.random.default_rng(0))


def test_cache_writes_once_and_reads_memory_mapped(images: np.ndarray, tmp_path: Path) -> None:
    from tta_server.data.datasets import LabeledImages

    data = LabeledImages(images, np.arange(len(images)) % 10, tuple("abcdefghij"))
    domain = Domain("fog", 2)
    with CorruptedSets(data, seed=4, cache_dir=tmp_path) as sets:
        first = sets.images(domain)
        assert sets.generated == [domain] and isinstance(first, np.memmap)
        assert sets.path(domain).parent == tmp_path / "corruptions"
        assert np.array_equal(first, corrupt(images, "fog", 2, seed=4))
        assert sets.images(Domain.clean()) is images
    with CorruptedSets(data, seed=4, cache_dir=tmp_path) as again:
        assert np.array_equal(again.images(domain), first) and again.generated == []
        assert again.path(domain) != CorruptedSets(data, seed=5, cache_dir=tmp_path).path(domain)
    with CorruptedSets(data, seed=4, cache_dir=tmp_path, persistent=False) as temporary:
        temporary.images(domain)
        folder = temporary.root
        assert folder.is_dir()
    assert not folder.exists()


def test_glass_scramble_gather_equals_the_sequential_loop(images: np.ndarray) -> None:
    """For delta 1 the vectorized gather reproduces the generator's sequential pixel loop exactly."""
    for iterations in (1, 2):
        fast = C.scramble_pixels(images.copy(), 1, iterations, np.random.default_rng(9))
        slow = C.scramble_pixels(images.copy(), 1, iterations, np.random.default_rng(9), sequential=True)
        assert np.array_equal(fast, slow) and not np.array_equal(fast, images)
    wide = C.scramble_pixels(images.copy(), 2, 1, np.random.default_rng(9))
    assert np.array_equal(wide[:, :3], images[:, :3])  # rows 0..delta are never targets
