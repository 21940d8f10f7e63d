"""Fuzzing (issue 8): property-based tests of the preprocessing-spec parser, the data parsing
and the labels reader, and mutated ONNX files fed to ``inspect``, ``augment`` and ``explain``.

The rule everywhere: a user's input either works or raises the project's own error
(:class:`onnxsal.errors.OnnxsalError`); never another exception, never a crash. The ONNX fuzz
runs ``benchmarks/fuzz.py`` in a subprocess (so that a crash of onnx or onnxruntime's C++ code
is caught and named, not fatal to pytest) with a fixed seed and a bounded number of cases.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxsal.data import RawImages, conform, load_dataset
from onnxsal.errors import InputError, OnnxsalError, OptionError
from onnxsal.preprocess import PRESETS, PreprocessSpec, from_json, parse

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# the preprocessing spec parser

_keys = st.sampled_from(["scale", "mean", "std", "size", "bgr", "rgb", "nhwc", "nchw", "SCALE",
                         "imagenet", "tf", "lite", "x255", "caffe", "none", "bogus", ""])
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 300).map(str),
    st.sampled_from(["", "nan", "inf", "-inf", "0", "1e400", "abc", "1,", ",", "1,,2", "3x", "x",
                     "0x0", "224x224", "-1x5", "2x2x2"]),
)
_values = st.lists(_numbers, min_size=0, max_size=4).map(",".join)
_token = st.one_of(
    st.tuples(_keys, st.sampled_from(["=", ""]), _values).map("".join),
    st.text(alphabet="=,;x. -0123456789abcdefnistz{}[]\"':", max_size=12),
)
_spec_text = st.lists(_token, max_size=5).map(lambda ts: " ".join(ts))
_json_value = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-10, 300) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
_json_spec = st.dictionaries(
    st.sampled_from(["scale", "mean", "std", "bgr", "layout", "size", "other"]),
    _json_value, max_size=5).map(lambda d: json.dumps(d))


def _check_spec(spec: PreprocessSpec) -> None:
    """What every accepted spec must satisfy: values the ONNX prefix can use."""
    assert math.isfinite(spec.scale) and spec.scale != 0
    for vals in (spec.mean, spec.std):
        if vals is not None:
            assert len(vals) >= 1 and all(math.isfinite(v) for v in vals)
    if spec.std is not None:
        assert all(v != 0 for v in spec.std)
    assert spec.layout in (None, "NCHW", "NHWC")
    if spec.size is not None:
        assert len(spec.size) == 2 and all(isinstance(v, int) and v > 0 for v in spec.size)
    # the JSON form written into results and model metadata reads back to the same spec
    assert from_json(spec.to_json()) == spec


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(_spec_text, _json_spec, st.text(max_size=30)))
@example(text="size=")
@example(text="scale=")
@example(text="std=0")
@example(text="mean=nan")
@example(text='{"size": [0]}')
@example(text='{"layout": "sideways"}')
@example(text='{"scale": 0}')
@example(text="size=0x0")
@example(text="scale=1e400")
def test_preprocess_parse_gives_a_valid_spec_or_an_option_error(text):
    try:
        spec = parse(text)
    except OptionError:
        return
    if spec is not None:
        _check_spec(spec)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(PRESETS)), layout=st.sampled_from(["", " nhwc", " nchw"]),
       size=st.sampled_from(["", " size=32x48", " size=7"]))
def test_preset_tokens_compose(name, layout, size):
    spec = parse(name + layout + size)
    _check_spec(spec)
    base = PRESETS[name]
    assert (spec.scale, spec.mean, spec.std, spec.bgr) == (base.scale, base.mean, base.std, base.bgr)
    if layout:
        assert spec.layout == layout.strip().upper()
    if size == " size=32x48":
        assert spec.size == (32, 48)
    elif size == " size=7":
        assert spec.size == (7, 7)


# ---------------------------------------------------------------------------------------------
# data parsing: image files with arbitrary bytes, arrays of any shape and type


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
       suffix=st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".tif", ".pgm"]))
def test_folder_of_garbage_files_lists_every_failure(tmp_path_factory, blobs, suffix):
    from skimage import io

    d = tmp_path_factory.mktemp("garbage")
    io.imsave(d / "good.png", np.full((5, 6, 3), 200, np.uint8), check_contrast=False)
    for i, b in enumerate(blobs):
        (d / f"bad{i}{suffix}").write_bytes(b)
    ds = load_dataset(d, shape=(3, 5, 6))
    assert "good.png" in ds.names
    assert len(ds) + len(ds.failures) == len(blobs) + 1  # every file is used or listed
    assert np.isfinite(ds.images).all() and ds.images.min() >= 0 and ds.images.max() <= 1


_img_dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int64, np.float16, np.float32,
                               np.float64, np.bool_])


@settings(max_examples=150, deadline=None)
@given(images=st.lists(hnp.arrays(_img_dtypes, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0,
                                                                 max_side=5)),
                       min_size=1, max_size=4),
       shape=st.sampled_from([None, (1, 4, 4), (3, 3, 5), (3, None, None), (2, 4, 4)]))
def test_conform_gives_model_ready_images_or_an_input_error(images, shape):
    from onnxsal.data import _to_float_hwc

    raw, failures = [], []
    for i, im in enumerate(images):
        try:
            raw.append(_to_float_hwc(im, f"im{i}"))
        except InputError as exc:
            failures.append((f"im{i}", str(exc)))
    try:
        ds = conform(RawImages(raw, None, [f"im{i}" for i in range(len(raw))], "fuzz",
                               failures=failures), shape)
    except InputError:
        return
    assert ds.images.dtype == np.float32 and ds.images.ndim == 4
    assert np.isfinite(ds.images).all() and ds.images.min() >= 0 and ds.images.max() <= 1
    if shape is not None:
        assert all(w is None or w == g for w, g in zip(shape, ds.shape))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=60), _json_value.map(json.dumps)))
@example(text="[1, 2")
@example(text='["a", ["b"]]')
def test_labels_file_gives_names_or_an_onnxsal_error(tmp_path_factory, text):
    from onnxsal.preprocess import read_labels

    p = tmp_path_factory.mktemp("labels") / "labels.txt"
    p.write_text(text, encoding="utf-8")
    try:
        labels = read_labels(p)
    except OnnxsalError:
        return
    assert isinstance(labels, list) and all(isinstance(v, str) for v in labels)


# ---------------------------------------------------------------------------------------------
# mutated ONNX files through inspect, augment and explain (benchmarks/fuzz.py)


def _fuzz_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnxsal_fuzz", ROOT / "benchmarks" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_judge_flags_everything_but_ok_and_one_error_line():
    judge = _fuzz_module().judge
    assert judge(0, "note: x\n") is None
    assert judge(2, "note: x\nerror: bad model\n") is None
    assert judge("exception ValueError: boom", "") == "exception ValueError: boom"
    assert "2 error lines" in judge(2, "error: a\nerror: b\n")
    assert "1 others" in judge(2, "error: a\n  continued on a second line\n")
    assert "exit code 1" in judge(1, "Error: click\n")
    assert judge(2, "Traceback (most recent call last):\nerror: x") == "traceback printed"


def test_fuzz_cases_are_reproducible_and_varied():
    fz = _fuzz_module()
    bases = fz.base_models()
    a = [fz.make_case(0, i, bases) for i in range(40)]
    b = [fz.make_case(0, i, bases) for i in range(40)]
    assert a == b
    assert len({data for data, _ in a}) == 40
    assert len({m for _, ms in a for m in ms}) >= 12


def test_mutated_onnx_files_give_onnxsal_errors_only(tmp_path):
    """300 mutated models (seed 0) through inspect, augment and explain: every run exits 0 or
    with one OnnxsalError line; no other exception, no crash, no hang. A good share of the
    cases must get past the checker, so that the pass and the engine are fuzzed too."""
    out = tmp_path / "fuzz.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--cases", "300",
                        "--seed", "0", "--no-figures", "--quiet", "--json", str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(out.read_text())
    assert summary["cases"] == 300 and summary["runs"] == 900
    assert summary["findings"] == [], json.dumps(summary["findings"], indent=1)
    assert p.returncode == 0, p.stderr[-2000:]
    for cmd in ("inspect", "augment", "explain"):
        assert summary["outcomes"][f"{cmd} ok"] >= 45, summary["outcomes"]
        assert summary["outcomes"][f"{cmd} error"] >= 100, summary["outcomes"]
    for name in ("subgraph", "sparse", "fake_augmented"):  # control flow, sparse data, metadata
        assert summary["mutations"].get(name, 0) >= 15, summary["mutations"]
