"""The bundled digits split: sizes, stratification, disjointness and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.models.data import PER_CLASS, SPLITS, load_split, split_indices, to_float

SIZES = {"train": 3000, "calibration": 1000, "test": 1000}
PINNED_TEST_HEAD = [3, 7, 21, 22, 24]


@pytest.mark.parametrize("name", SPLITS)
def test_split_has_documented_size_shape_and_dtypes(name: str) -> None:
    images, labels = load_split(name)
    assert images.shape == (SIZES[name], 1, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (SIZES[name],)
    assert labels.dtype == np.int64


@pytest.mark.parametrize("name", SPLITS)
def test_split_is_stratified_per_class(name: str) -> None:
    _, labels = load_split(name)
    assert np.bincount(labels, minlength=10).tolist() == [PER_CLASS[name]] * 10


def test_splits_are_disjoint_and_cover_all_5000_images() -> None:
    indices = [set(split_indices(name).tolist()) for name in SPLITS]
    assert sum(len(part) for part in indices) == 5000
    assert len(set().union(*indices)) == 5000


def test_splits_share_no_identical_image_across_train_and_test() -> None:
    train = {image.tobytes() for image in load_split("train")[0]}
    test = {image.tobytes() for image in load_split("test")[0]}
    assert not train & test


@pytest.mark.parametrize("name", SPLITS)
def test_split_is_deterministic_across_calls(name: str) -> None:
    first_images, first_labels = load_split(name)
    again_images, again_labels = load_split(name)
    np.testing.assert_array_equal(first_images, again_images)
    np.testing.assert_array_equal(first_labels, again_labels)
    np.testing.assert_array_equal(split_indices(name), split_indices(name))


def test_editing_a_returned_split_does_not_corrupt_the_cache() -> None:
    images, labels = load_split("train")
    images[:] = 0
    labels[:] = -1
    cached_images, cached_labels = load_split("train")
    assert cached_images.any()
    assert cached_labels.min() == 0


def test_split_indices_are_pinned_to_seed_zero() -> None:
    assert split_indices("test")[:5].tolist() == PINNED_TEST_HEAD


def test_images_are_real_digits_not_blank() -> None:
    images, _ = load_split("test")
    ink = (images > 0).mean(axis=(1, 2, 3))
    assert ink.min() > 0.03
    assert images.max() == 255


def test_to_float_scales_to_unit_range_as_float32() -> None:
    images, _ = load_split("calibration")
    pixels = to_float(images)
    assert pixels.dtype == np.float32
    assert pixels.shape == images.shape
    assert pixels.min() == 0.0
    assert pixels.max() == 1.0


def test_to_float_rejects_non_uint8_input() -> None:
    with pytest.raises(TypeError):
        to_float(np.zeros((1, 1, 28, 28), dtype=np.float64))


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        split_indices("validation")  # type: ignore[arg-type]
