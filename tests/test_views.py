"""Test-time views (``views`` in the manifest): each crop classified flipped and turned, probabilities averaged."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import manifest_dict
from hemaedge.edge.bundle.manifest import InputSpec, parse_manifest
from hemaedge.edge.classify.views import expand, merge
from hemaedge.edge.errors import BundleError


def _batch(n: int = 3, size: int = 5) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 3, size, size)).astype(np.float32)


def test_the_views_are_the_crop_flipped_and_turned_view_major():
    x = _batch()
    assert expand(x, 1) is x
    e = expand(x, 8)
    assert e.shape == (24, 3, 5, 5) and e.flags.c_contiguous
    views = e.reshape(8, 3, 3, 5, 5)
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1], x[..., ::-1])  # mirrored left-right
    np.testing.assert_array_equal(views[2], x[..., ::-1, :])  # mirrored top-bottom
    np.testing.assert_array_equal(views[3], np.rot90(x, 1, axes=(2, 3)))  # turned 90 degrees
    assert len({v.tobytes() for v in views}) == 8  # all eight turns and mirrors, none twice
    for v in views:  # each view only moves pixels
        np.testing.assert_array_equal(np.sort(v, axis=None), np.sort(x, axis=None))
    with pytest.raises(ValueError, match="views"):
        expand(x, 3)


def test_merge_averages_each_crops_views():
    p = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], np.float32)  # 2 views x 2 crops
    np.testing.assert_allclose(merge(p, 2), [[0.5, 0.5], [0, 1]])
    assert merge(p, 1) is p


def test_the_station_averages_the_views_a_bundle_asks_for():
    from hemaedge.edge.station import classify_crops

    class Backend:  # its answer depends on how the crop lies: class a when the top-left is brighter
        seen = 0

        def classify(self, batch):
            Backend.seen += len(batch)
            a = (batch[:, :, :4, :4].mean(axis=(1, 2, 3)) > batch[:, :, -4:, -4:].mean(axis=(1, 2, 3))).astype(float)
            return np.stack([a, 1 - a], 1).astype(np.float32)

    def bundle(views):
        class B:
            class manifest:  # noqa: N801 - a stand-in for the bundle's manifest
                input = InputSpec(height=16, width=16)
                classes = ("a", "b")

        B.manifest.views = views
        return B

    img = np.full((16, 16, 3), 60, np.uint8)
    img[:8, :8] = 220  # bright top-left: class a as it lies, class b mirrored top-bottom or turned
    once = classify_crops(Backend(), bundle(1), [img])[0]
    assert once.class_name == "a" and once.confidence == 1.0 and Backend.seen == 1
    four = classify_crops(Backend(), bundle(4), [img, img])
    assert Backend.seen == 1 + 8  # two crops in four views each, one call
    # only the crop as it lies has its bright corner top-left (a); mirrored left-right it is top-right, mirrored
    # top-bottom bottom-left, turned 90 degrees anticlockwise bottom-left: b three times out of four
    assert four[0].probabilities.tolist() == pytest.approx([0.25, 0.75]) and four[0].class_name == "b"


def test_the_manifest_says_how_many_views_and_refuses_what_cannot_be():
    assert parse_manifest(manifest_dict()).views == 1  # absent: each crop once, as before
    m = parse_manifest(manifest_dict(views=4))
    assert m.views == 4 and m.to_dict()["views"] == 4 and m.schema_version == 1  # an older reader classifies once
    for bad in (3, 0, "4", True):
        with pytest.raises(BundleError, match="views"):
            parse_manifest(manifest_dict(views=bad))
    wide = manifest_dict({"width": 12}, views=4)
    with pytest.raises(BundleError, match="square"):
        parse_manifest(wide)
    wide["views"] = 2  # mirroring keeps the shape
    assert parse_manifest(wide).views == 2
