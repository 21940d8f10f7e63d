"""converters.jax_export: flax functions to ONNX via jax2onnx, parity with JAX, the raw
reduce_window MaxPool rewrite, external data beside the model, module:function sources."""

from __future__ import annotations

import json
import sys
import textwrap

import flax.linen as nn  # the jax extra is installed in CI: no skip
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from jax import lax

from converters import jax_export as je
from onnxsal.engine import Engine
from onnxsal.errors import OptionError
from onnxsal.model import load_model


class CNN(nn.Module):
    raw_pool: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        if self.raw_pool:
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        else:
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(5, (3, 3), padding="SAME")(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def make(raw_pool=False):
    m = CNN(raw_pool=raw_pool)
    return m.apply, m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)))


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).random((5, 8, 8, 2), dtype=np.float32)


def _run(path_or_proto, x):
    src = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_export_parity_metadata_dynamic_batch(x, tmp_path):
    apply, params = make()
    out = tmp_path / "m.onnx"
    proto = je.export(apply, (2, 8, 8), out, params=params, labels=["a", "b", "c"],
                      preprocess={"scale": 255.0})
    assert not proto.graph.value_info  # jax2onnx's wrong annotations are dropped
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["onnxsal.preprocess"])["layout"] == "NHWC"
    assert json.loads(meta["onnxsal.labels"]) == ["a", "b", "c"]
    p = je.parity(apply, out, x, params=params)
    assert p["max_abs_logit_diff"] < 1e-5 and p["argmax_agreement"] == 1.0
    np.testing.assert_allclose(_run(out, x[:1]), np.asarray(apply(params, x[:1])), atol=1e-5)
    eng = Engine(out, device="cpu", threads=1)
    assert eng.input_shape == (2, 8, 8) and eng.labels == ["a", "b", "c"]
    np.testing.assert_allclose(eng.logits(x.transpose(0, 3, 1, 2)),
                               np.asarray(apply(params, x * 255.0)), rtol=1e-4, atol=1e-4)


def test_raw_reduce_window_maxpool_is_rewritten(x):
    apply, params = make(raw_pool=True)
    from jax2onnx import to_onnx

    raw = to_onnx(lambda v: apply(params, v), inputs=[("N", 8, 8, 2)], opset=23)
    with pytest.raises(Exception, match="pooling"):  # what the rewrite is for
        _run(raw, x)
    assert je.rewrite_reduce_window_maxpool(raw) == 1
    pools = [n for n in raw.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pools[0].attribute}
    assert attrs["kernel_shape"] == [3, 3] and attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    np.testing.assert_allclose(_run(raw, x), np.asarray(apply(params, x)), atol=1e-5)
    # and export does it by itself
    proto = je.export((apply, params), (2, 8, 8))
    np.testing.assert_allclose(_run(proto, x), np.asarray(apply(params, x)), atol=1e-5)


def test_external_data_beside_the_model(tmp_path):
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.Dense(4)(nn.relu(nn.Dense(400)(v.reshape(v.shape[0], -1))))

    m = Wide()
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))   # 768 x 400 floats: 1.2 MB
    out = tmp_path / "wide.onnx"
    je.export(m.apply, (3, 16, 16), out, params=params)
    assert (tmp_path / "wide.onnx.data").stat().st_size >= 768 * 400 * 4
    assert out.stat().st_size < 100_000
    loaded = load_model(out)  # checks the external path stays in the model's folder
    v = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    np.testing.assert_allclose(_run(loaded, v), np.asarray(m.apply(params, v)), atol=1e-5)
    # written twice: the data file is replaced, not appended to
    je.export(m.apply, (3, 16, 16), out, params=params)
    assert (tmp_path / "wide.onnx.data").stat().st_size < 2 * 768 * 400 * 4


def test_option_errors(tmp_path):
    apply, params = make()
    with pytest.raises(OptionError, match="opset"):
        je.export(apply, (2, 8, 8), params=params, opset=17)
    with pytest.raises(OptionError, match="input shape"):
        je.export(apply, (8, 8), params=params)
    with pytest.raises(OptionError, match="labels"):
        je.export(apply, (2, 8, 8), params=params, labels=["x"])
    f = tmp_path / "weights.msgpack"
    f.write_bytes(b"\x00")
    with pytest.raises(OptionError, match="module:function"):
        je.export(str(f), (2, 8, 8))


def test_module_function_source_and_cli(tmp_path, monkeypatch, x):
    (tmp_path / "jaxsrc_tiny.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp
        def build():
            w = jax.random.normal(jax.random.PRNGKey(3), (2, 4))
            return lambda v: v.mean(axis=(1, 2)) @ w
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from onnxsal.cli import cli

    out = tmp_path / "f.onnx"
    res = CliRunner().invoke(cli, ["convert", "jax", "jaxsrc_tiny:build", "-o", str(out),
                                   "--input-shape", "2,8,8"])
    assert res.exit_code == 0, res.output
    assert "parity vs jax" in res.output
    sys.modules.pop("jaxsrc_tiny", None)
    fn = je.as_function("jaxsrc_tiny:build")
    np.testing.assert_allclose(_run(out, x), np.asarray(fn(x)), atol=1e-5)
    res = CliRunner().invoke(cli, ["convert", "jax", "jaxsrc_tiny:build", "-o", str(out)])
    assert res.exit_code != 0 and "--input-shape" in str(res.exception)
