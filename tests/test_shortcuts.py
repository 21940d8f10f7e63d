"""The shortcut finder (onnxsal.shortcuts, docs/shortcuts.md): a hand-built model that reads a
known corner, the bundled Fashion-MNIST models trained with and without a planted tag, input
checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxsal.errors import InputError, OptionError
from onnxsal.shortcuts import box_iou, find_shortcuts, hot_box, shortcut_examples

H = W = 16
CORNER = [1, 12, 4, 15]  # rows 1..3, columns 12..14


def _toy_logits(x):
    """Class 1 iff the corner is bright; class 2 iff the whole image is bright; else class 0."""
    corner = x[:, 0, 1:4, 12:15].mean((1, 2))
    overall = x[:, 0].mean((1, 2))
    return np.stack([np.zeros(len(x)), 20 * (corner - 0.5), 20 * (overall - 0.45)], 1).astype(np.float32)


def _toy_data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.4, (3 * n, 1, H, W)).astype(np.float32)
    x[n:2 * n, 0, 1:4, 12:15] = rng.uniform(0.8, 1, (n, 3, 3))
    x[2 * n:] += 0.3
    y = np.repeat([0, 1, 2], n).astype(np.int64)
    # gradient x input of the toy's logit of each image's class: the corner for class 1,
    # uniform for class 2, zero for class 0
    grad = np.zeros((3, H, W), np.float32)
    grad[1, 1:4, 12:15] = 20 / 9
    grad[2] = 20 / (H * W)
    maps = x[:, 0] * grad[y]
    return x, y, maps


def test_toy_finds_exactly_the_corner():
    x, y, maps = _toy_data()
    calls = []

    def logits(z):
        calls.append(len(z))
        return _toy_logits(z)

    r = find_shortcuts(logits, x, y, maps, num_classes=3, seed=0)
    json.dumps(r)  # JSON-ready
    flagged = [f for f in r["findings"] if f["suspected"]]
    assert [f["class"] for f in flagged] == [1]
    f = flagged[0]
    # the hot region is exactly the corner; the reported box is it grown by box_grow (1 pixel)
    assert f["box"] == [CORNER[0] - 1, CORNER[1] - 1, CORNER[2] + 1, CORNER[3] + 1]
    exact = find_shortcuts(_toy_logits, x, y, maps, num_classes=3, seed=0, box_grow=0)
    assert [g["box"] for g in exact["findings"] if g["suspected"]] == [CORNER]
    assert f["paste_flip_rate"] > 0.95 and f["control_flip_rate"] < 0.2
    assert f["blank_flip_rate"] > 0.95 and f["control_blank_flip_rate"] < 0.05
    # the 9 corner pixels are the only salient ones of every class-1 map: 9 of the 25 in the
    # grown box, lift = (9/25) / (25/256) = 3.69; in the exact box all of them
    assert f["lift"] == pytest.approx((9 / 25) / (25 / 256))
    e1 = next(g for g in exact["findings"] if g["class"] == 1)
    assert e1["consistency"] == 1.0 and e1["concentration"] == 1.0
    # class 2's evidence is the whole image: the random box of that size flips as often
    c2 = next(g for g in r["findings"] if g["class"] == 2)
    assert not c2["suspected"] and c2["paste_excess"] < 0.1
    # batched: the clean predictions + 10 classes' interventions in few large calls
    assert len(calls) == r["settings"]["calls"] <= 6 and max(calls) <= r["settings"]["batch_size"]
    # examples are real flips, and their pixels reproduce them
    src, before, after = shortcut_examples(x, f)
    assert len(after) == len(f["examples"]) == 4
    assert (_toy_logits(after).argmax(1) == 1).all()
    assert (_toy_logits(before).argmax(1) == [e["before"] for e in f["examples"]]).all()
    y0, x0, y1, x1 = f["box"]
    np.testing.assert_array_equal(after[:, :, y0:y1, x0:x1], src[:, :, y0:y1, x0:x1])


def test_toy_is_deterministic_and_seeded():
    x, y, maps = _toy_data()
    a = find_shortcuts(_toy_logits, x, y, maps, num_classes=3, seed=3)
    b = find_shortcuts(_toy_logits, x, y, maps, num_classes=3, seed=3)
    assert a == b
    only = find_shortcuts(_toy_logits, x, y, maps, num_classes=3, seed=3, classes=[1])
    assert [f["class"] for f in only["findings"]] == [1] and only["findings"][0]["suspected"]
    c = find_shortcuts(_toy_logits, x, y, maps, num_classes=3, seed=4)
    assert [f["examples"] for f in a["findings"]] != [f["examples"] for f in c["findings"]]


def test_rgb_red_tag_and_per_channel_blank():
    """Three channels: the model reads a red corner (red bright, green dark); pasting copies
    all channels, blanking fills each channel with its own mean."""
    rng = np.random.default_rng(1)
    n = 40
    x = rng.uniform(0.2, 0.4, (2 * n, 3, 12, 12)).astype(np.float32)
    x[n:, 0, 8:11, 0:3], x[n:, 1, 8:11, 0:3] = 1.0, 0.0
    y = np.repeat([0, 1], n).astype(np.int64)

    def logits(z):
        red = z[:, 0, 8:11, 0:3].mean((1, 2)) - z[:, 1, 8:11, 0:3].mean((1, 2))
        return np.stack([np.zeros(len(z)), 10 * (red - 0.5)], 1)

    maps = np.zeros((2 * n, 12, 12), np.float32)
    maps[n:, 8:11, 0:3] = 1.0
    maps += rng.uniform(0, 0.01, maps.shape).astype(np.float32)
    r = find_shortcuts(logits, x, y, maps, num_classes=2, box_grow=0, pairs=50)
    f = r["findings"][1]
    assert f["suspected"] and f["box"] == [8, 0, 11, 3]
    assert f["paste_flip_rate"] == 1.0 and f["blank_flip_rate"] == 1.0
    assert f["control_flip_rate"] == 0.0 and f["control_blank_flip_rate"] == 0.0
    assert not r["findings"][0]["suspected"]


def test_hot_box_and_iou():
    d = np.zeros((10, 10))
    d[2:4, 5:8] = 1.0
    d[8, 0] = 0.9  # a second hot spot, not connected to the peak's region
    d[3, 6] = 2.0
    assert hot_box(d, 0.4) == [2, 5, 4, 8]
    assert hot_box(d, 0.4, grow=0.25) == [1, 4, 5, 9]  # at least one pixel per side
    assert hot_box(d, 0.4, grow=1.0) == [0, 2, 6, 10]  # grown by the side, clipped to the image
    assert hot_box(-np.ones((4, 4)), 0.5) is None
    assert box_iou([0, 0, 4, 4], [0, 0, 4, 4]) == 1.0
    assert box_iou([0, 0, 4, 4], [2, 2, 6, 6]) == pytest.approx(4 / 28)
    assert box_iou([0, 0, 2, 2], [5, 5, 6, 6]) == 0.0


@pytest.mark.parametrize("change, error, text", [
    (lambda x, y, m: (x[:, 0], y, m), InputError, "images must be [N, C, H, W]"),
    (lambda x, y, m: (x, y[:-1], m), InputError, "labels must be [N]"),
    (lambda x, y, m: (x, y, m[:, :-1]), InputError, "maps must be [N, H, W]"),
    (lambda x, y, m: (x, y, np.where(np.arange(len(m))[:, None, None] == 7, np.nan, m)), InputError,
     "maps hold NaN or Inf (first at image 7)"),
    (lambda x, y, m: (x, np.ones_like(y), m), InputError, "at least two classes"),
    (lambda x, y, m: (x, y + 5, m), InputError, "labels out of range"),
    (lambda x, y, m: (x, y.astype(np.float32), m), InputError, "labels must be integers"),
])
def test_input_checks(change, error, text):
    x, y, maps = _toy_data(n=10)
    x, y, maps = change(x, y, maps)
    with pytest.raises(error) as e:
        find_shortcuts(_toy_logits, x, y, maps, num_classes=3)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_option_and_model_checks():
    x, y, maps = _toy_data(n=10)
    with pytest.raises(OptionError, match="unknown shortcut finder option"):
        find_shortcuts(_toy_logits, x, y, maps, num_classes=3, pair=3)
    with pytest.raises(OptionError, match=r"classes must be in 0..2"):
        find_shortcuts(_toy_logits, x, y, maps, num_classes=3, classes=[1, 3])
    with pytest.raises(OptionError, match="box_threshold"):
        find_shortcuts(_toy_logits, x, y, maps, num_classes=3, box_threshold=0)
    with pytest.raises(OptionError, match="num_classes"):
        find_shortcuts(_toy_logits, x, y, maps, num_classes=1)
    with pytest.raises(InputError, match=r"predict_logits returned shape \[30, 3\] .* expected \[30, 4\]"):
        find_shortcuts(_toy_logits, x, y, maps, num_classes=4)


# -- the bundled Fashion-MNIST models (benchmarks/shortcut_demo.py; tests/data/README.md) ----

DATA = __import__("pathlib").Path(__file__).resolve().parent / "data"


def _bundled(model: str, key: str):
    from onnxsal.engine import Engine
    from onnxsal.methods import compute

    d = np.load(DATA / "fmnist_tag_sample.npz")
    x, y = d[key].astype(np.float32) / 255.0, d["y"]
    eng = Engine(DATA / f"fmnist_{model}_cnn.onnx", device="cpu", threads=1, use_disk_cache=False)
    maps = compute(eng, x, "vanilla", targets=y)["vanilla"].maps
    res = find_shortcuts(eng.logits, x, y, maps, num_classes=10, seed=0)
    return res, [int(v) for v in d["tag_box"]], int(d["tag_class"])


def test_tagged_model_names_the_tag_class_and_box():
    res, tag_box, tag_class = _bundled("tagged", "x")
    flagged = [f for f in res["findings"] if f["suspected"]]
    assert [f["class"] for f in flagged] == [tag_class]
    f = flagged[0]
    assert box_iou(f["box"], tag_box) > 0.3
    assert f["paste_excess"] > 0.4 and f["lift"] > 10  # measured: 0.52 and 17.8
    assert f["blank_flip_rate"] > 0.5 > f["control_blank_flip_rate"]  # measured 0.77 vs 0.0
    assert all(e["after"] == tag_class != e["before"] for e in f["examples"])


def test_clean_model_flags_nothing_even_with_the_tag_in_the_data():
    res, _, _ = _bundled("clean", "x")
    assert [f["class"] for f in res["findings"] if f["suspected"]] == []
    assert max(f["paste_excess"] for f in res["findings"]) < 0.2  # measured 0.08


def test_tagged_model_on_untagged_data_flags_nothing():
    """The finder needs the shortcut in the audit data (docs/shortcuts.md#limits): without the
    tag in the images, pasting boxes of them carries no tag."""
    res, _, _ = _bundled("tagged", "x_clean")
    assert [f["class"] for f in res["findings"] if f["suspected"]] == []
