"""How images of another size or orientation reach the model: the three resize modes and EXIF."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta_server.serving.decode import InputLimits, decode_image_files, decode_npy
from tta_server.zoo.catalogue import IMAGENET_MEAN, ModelSpec, project_specs, third_party_specs, user_specs
from tta_server.zoo.transforms import ResizeMode, fit_geometry, pad_colour

LIMITS = InputLimits()
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(image: np.ndarray | Image.Image, **save: object) -> bytes:
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    pil.save(buf, format=save.pop("format", "PNG"), **save)  # type: ignore[arg-type]
    return buf.getvalue()


def banded_frame(width: int = 1280, height: int = 720) -> np.ndarray:
    """A 16:9 frame: red left of the centre square, green inside it, blue right of it."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    left = (width - height) // 2
    frame[:, :left] = RED
    frame[:, left : left + height] = GREEN
    frame[:, left + height :] = BLUE
    return frame


# --- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "box", "scaled", "offset"),
    [
        ("squash", (0, 0, 1280, 720), (224, 224), (0, 0)),
        ("resize_crop", (280, 0, 1000, 720), (224, 224), (0, 0)),
        ("letterbox", (0, 0, 1280, 720), (224, 126), (0, 49)),
    ],
)
def test_geometry_of_a_16_9_frame(
    mode: str, box: tuple[int, ...], scaled: tuple[int, int], offset: tuple[int, int]
) -> None:
    g = fit_geometry(1280, 720, 224, mode)
    assert (g.source_box, g.scaled, g.offset) == (box, scaled, offset)
    assert g.padded == (mode == "letterbox")


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_every_mode_keeps_a_square_image_whole(mode: ResizeMode) -> None:
    g = fit_geometry(500, 500, 32, mode)
    assert g.source_box == (0, 0, 500, 500) and g.scaled == (32, 32) and not g.padded


def test_geometry_rejects_unknown_modes_and_empty_sizes() -> None:
    with pytest.raises(ValueError):
        fit_geometry(10, 10, 8, "stretch")
    with pytest.raises(ValueError):
        fit_geometry(0, 10, 8, "squash")


# --- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_images_at_the_input_size_pass_through_bit_identical(mode: ResizeMode) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    decoded = decode_image_files([png(a) for a in images], 32, LIMITS, resize_mode=mode)
    np.testing.assert_array_equal(decoded, images)
    buf = io.BytesIO()
    np.save(buf, images)
    np.testing.assert_array_equal(decode_npy(buf.getvalue(), 32, LIMITS, resize_mode=mode), images)


def test_default_mode_is_the_squash_of_before() -> None:
    frame = banded_frame(64, 36)
    expected = np.asarray(Image.fromarray(frame).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image_files([png(frame)], 16, LIMITS)[0], expected)
    buf = io.BytesIO()
    np.save(buf, frame[None])
    np.testing.assert_array_equal(decode_npy(buf.getvalue(), 16, LIMITS)[0], expected)


def test_squash_keeps_all_three_bands() -> None:
    out = decode_image_files([png(banded_frame())], 32, LIMITS, resize_mode="squash")[0]
    assert tuple(out[16, 0]) == RED and tuple(out[16, 16]) == GREEN and tuple(out[16, 31]) == BLUE


def test_resize_crop_keeps_only_the_centre_square() -> None:
    out = decode_image_files([png(banded_frame())], 32, LIMITS, resize_mode="resize_crop")[0]
    assert (out == np.array(GREEN, dtype=np.uint8)).all()


def test_letterbox_keeps_everything_and_pads_with_the_fill_colour() -> None:
    fill = pad_colour(IMAGENET_MEAN)
    out = decode_image_files([png(banded_frame())], 32, LIMITS, resize_mode="letterbox", fill=fill)[0]
    # 1280x720 -> 32x18 pasted at y = 7: rows 0-6 and 25-31 are padding
    assert (out[:7] == np.array(fill, dtype=np.uint8)).all() and (out[25:] == np.array(fill, dtype=np.uint8)).all()
    assert tuple(out[16, 0]) == RED and tuple(out[16, 16]) == GREEN and tuple(out[16, 31]) == BLUE


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_npy_batches_follow_the_same_modes(mode: ResizeMode) -> None:
    frame = banded_frame(128, 72)
    buf = io.BytesIO()
    np.save(buf, np.stack([frame, frame]))
    from_npy = decode_npy(buf.getvalue(), 32, LIMITS, resize_mode=mode, fill=(1, 2, 3))
    from_png = decode_image_files([png(frame)], 32, LIMITS, resize_mode=mode, fill=(1, 2, 3))
    assert from_npy.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(from_npy[0], from_png[0])


def test_pad_colour_is_the_mean_in_uint8() -> None:
    assert pad_colour(IMAGENET_MEAN) == (124, 116, 104)


# --- EXIF orientation ---------------------------------------------------------------------


def top_red_bottom_blue(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2] = RED
    pixels[height // 2 :] = BLUE
    return Image.fromarray(pixels)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    """Orientation 6 means "rotate 90 degrees clockwise to view": the stored top edge ends up on the right."""
    image = top_red_bottom_blue(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    blob = png(image, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt != "PNG" else {}))
    out = decode_image_files([blob], 16, LIMITS, resize_mode="squash")[0].astype(int)
    right, left = out[8, 14], out[8, 1]
    assert right[0] > 200 and right[2] < 60, right  # red on the right
    assert left[2] > 200 and left[0] < 60, left  # blue on the left


def test_exif_orientation_decides_what_resize_crop_keeps() -> None:
    """A portrait phone photo stored as landscape pixels is cropped as the portrait it is."""
    image = top_red_bottom_blue(90, 30)  # stored landscape; viewed portrait 30 x 90
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to view
    out = decode_image_files([png(image, exif=exif.tobytes())], 30, LIMITS, resize_mode="resize_crop")[0]
    assert out.shape == (30, 30, 3)
    # upright, the red/blue boundary is vertical and runs through the kept centre square
    assert tuple(out[15, 0]) == RED and tuple(out[15, 29]) == BLUE


def test_a_broken_exif_block_does_not_fail_the_image() -> None:
    image = top_red_bottom_blue(32, 32)
    blob = png(image, format="JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    out = decode_image_files([blob], 32, LIMITS)
    assert out.shape == (1, 32, 32, 3)


# --- the model spec -----------------------------------------------------------------------


def test_catalogue_models_resize_then_crop(tmp_path: Path) -> None:
    for spec in third_party_specs(tmp_path) + project_specs():
        assert spec.resize_mode is ResizeMode.RESIZE_CROP, spec.name
        assert spec.input_size == 32


def test_bring_your_own_models_choose_their_mode(tmp_path: Path) -> None:
    entry = {
        "name": "cam",
        "arch": "torchvision:resnet18",
        "weights": "w.safetensors",
        "classes": ["a", "b"],
        "input_size": 224,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "resize_mode": "letterbox",
        "card": "card.json",
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [entry]}))
    (spec,) = user_specs(path)
    assert spec.resize_mode is ResizeMode.LETTERBOX and spec.pad_colour == (128, 128, 128)
    assert spec.card == (tmp_path / "card.json").resolve()
    with pytest.raises(ValueError, match="resize_mode"):
        ModelSpec.model_validate({**entry, "resize_mode": "stretch"})
