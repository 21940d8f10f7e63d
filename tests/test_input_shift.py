"""Engine(input_shift=c): the shift-compensated model of the input-invariance test, f2(x + c) =
f(x), built by folding the shift into the prepended preprocessing."""

from pathlib import Path

import numpy as np
import pytest

from onnxsal import methods
from onnxsal.data import load_dataset
from onnxsal.engine import Engine
from onnxsal.errors import InputError, OptionError
from onnxsal.preprocess import PreprocessSpec

DATA = Path(__file__).parent / "data"
MODEL, SAMPLE = DATA / "digits_cnn.onnx", DATA / "digits_sample.npz"


@pytest.fixture(scope="module")
def images():
    return load_dataset(str(SAMPLE), shape=(1, 20, 20), limit=6).images


def test_spec_shift_keeps_what_the_model_sees():
    spec = PreprocessSpec(scale=2.0, mean=(1.0,), std=(0.5,))
    x = np.linspace(0, 1, 11)
    c = 0.75
    s = spec.shifted(c)
    assert s.mean == (2.5,) and s.std == spec.std and s.scale == spec.scale
    np.testing.assert_allclose(((x + c) * s.scale - s.mean[0]) / s.std[0],
                               (x * spec.scale - spec.mean[0]) / spec.std[0])
    assert PreprocessSpec().shifted(0.3).mean == (0.3,) and spec.shifted(0) is spec


@pytest.mark.parametrize("preprocess", [None, "tf"])
def test_shifted_engine_gives_the_same_logits_and_gradients(images, preprocess):
    c = 1.0
    eng = Engine(str(MODEL), preprocess=preprocess, device="cpu", threads=1, use_disk_cache=False)
    shifted = Engine(str(MODEL), preprocess=preprocess, input_shift=c, device="cpu", threads=1,
                     use_disk_cache=False)
    assert shifted.input_range == (1.0, 2.0) and eng.input_range == (0.0, 1.0)
    np.testing.assert_allclose(shifted.logits(images + np.float32(c)), eng.logits(images),
                               rtol=1e-5, atol=1e-5)
    a = methods.compute(eng, images, ["vanilla", "gradient_x_input"])
    b = methods.compute(shifted, images + np.float32(c), ["vanilla", "gradient_x_input"])
    np.testing.assert_allclose(b["vanilla"].maps, a["vanilla"].maps, rtol=1e-4, atol=1e-6)
    # gradient x input multiplies by the shifted input: not invariant (Kindermans et al. 2019)
    assert np.abs(b["gradient_x_input"].maps - a["gradient_x_input"].maps).max() > 1e-3


def test_shifted_engine_checks_its_own_range(images):
    shifted = Engine(str(MODEL), input_shift=1.0, device="cpu", threads=1, use_disk_cache=False)
    with pytest.raises(InputError, match=r"shifted by 1 \(this engine takes \[1, 2\]\)"):
        methods.compute(shifted, images, ["vanilla"])
    with pytest.raises(OptionError, match="input_shift must be finite"):
        Engine(str(MODEL), input_shift=float("nan"), device="cpu", use_disk_cache=False)
