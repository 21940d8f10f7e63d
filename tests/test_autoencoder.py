"""The adversarial autoencoder folder: training (converters side, torch), ONNX export, and
loading as untrusted input (onnxsal.autoencoder; docs/abele.md#format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxsal.autoencoder import ALLOWED_OPS, load_autoencoder
from onnxsal.cli import cli, main
from onnxsal.errors import InputError

DATA = Path(__file__).parent / "data"
AAE = DATA / "aae_digits"
MODEL = DATA / "digits_cnn.onnx"
SAMPLE = DATA / "digits_sample.npz"


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_train_autoencoder_cli_writes_loadable_onnx(tmp_path):
    out = tmp_path / "aae"
    res = CliRunner().invoke(cli, ["train-autoencoder", "--data", str(SAMPLE), "--limit", "40",
                                   "--epochs", "1", "--latent", "5", "--model", str(MODEL),
                                   "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "autoencoder.json").read_text())
    assert rec["latent"] == 5 and rec["input_shape"] == [1, 20, 20]
    assert rec["training"]["epochs"] == 1 and rec["training"]["images"] == 36  # 4 held out
    assert rec["heldout"]["images"] == 4 and rec["heldout"]["reconstruction_mse"] > 0
    for f in ("encoder", "decoder", "discriminator"):
        m = onnx.load(str(out / f"{f}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        assert {n.op_type for n in m.graph.node} <= ALLOWED_OPS
    # the exported files compute what onnxsal's loader gives, shapes as recorded
    ae = load_autoencoder(out)
    x = np.load(SAMPLE)["x"][:3].astype(np.float32) / 255
    z = _session(out / "encoder.onnx").run(None, {"image": x})[0]
    assert z.shape == (3, 5)
    np.testing.assert_allclose(ae.encode(x), z, rtol=1e-6)
    dec = ae.decode(z)
    assert dec.shape == (3, 1, 20, 20) and dec.min() >= 0 and dec.max() <= 1
    held = rec["heldout"]["reconstruction_mse"]
    assert 0 < held < 0.5
    p = ae.discriminate(z)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()


def test_bundled_digits_autoencoder_record_matches_its_files():
    rec = json.loads((AAE / "autoencoder.json").read_text())
    ae = load_autoencoder(AAE)
    assert ae.latent == rec["latent"] and list(ae.input_shape) == rec["input_shape"] == [1, 20, 20]
    # its recorded held-out error is the error it really has: measured here on the 200 bundled
    # test images (never seen in training) it is of the same size
    x = np.load(SAMPLE)["x"].astype(np.float32) / 255
    mse = float(((ae.decode(ae.encode(x)) - x) ** 2).mean())
    assert mse < 2 * rec["heldout"]["reconstruction_mse"] + 0.005
    assert mse < 0.05


def _copy(tmp_path) -> Path:
    d = tmp_path / "aae"
    shutil.copytree(AAE, d)
    return d


def _edit(d: Path, **changes):
    rec = json.loads((d / "autoencoder.json").read_text())
    rec.update(changes)
    (d / "autoencoder.json").write_text(json.dumps(rec))


def _hostile_cases(tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(AAE / "encoder.onnx", outside)
    files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "discriminator": "discriminator.onnx"}
    cases = {}

    def case(name, fn, match):
        d = tmp_path / name
        shutil.copytree(AAE, d)
        fn(d)
        cases[name] = (d, match)

    case("dotdot", lambda d: _edit(d, files={**files, "encoder": "../outside.onnx"}), "plain file name")
    case("absolute", lambda d: _edit(d, files={**files, "encoder": str(outside)}), "plain file name")
    case("subdir", lambda d: _edit(d, files={**files, "decoder": "x/decoder.onnx"}), "plain file name")
    case("not_a_string", lambda d: _edit(d, files={**files, "decoder": 3}), "plain file name")

    def link(d):
        (d / "encoder.onnx").unlink()
        (d / "encoder.onnx").symlink_to(outside)
    case("symlink", link, "outside the folder")
    case("missing_file", lambda d: (d / "decoder.onnx").unlink(), "decoder file 'decoder.onnx' not found")
    case("no_json", lambda d: (d / "autoencoder.json").unlink(), "no autoencoder.json")
    case("bad_json", lambda d: (d / "autoencoder.json").write_text("{not json"), "not valid JSON")
    case("deep_json", lambda d: (d / "autoencoder.json").write_text("[" * 200000 + "]" * 200000),
         "not valid JSON")

    def config_link(d):
        (tmp_path / "elsewhere.json").write_text((d / "autoencoder.json").read_text())
        (d / "autoencoder.json").unlink()
        (d / "autoencoder.json").symlink_to(tmp_path / "elsewhere.json")
    case("config_link", config_link, "autoencoder.json leads outside the folder")
    case("format", lambda d: _edit(d, format="other/9"), "format must be")
    case("latent", lambda d: _edit(d, latent=7), "does not match")
    case("latent_type", lambda d: _edit(d, latent="4"), "latent must be an integer")
    case("shape", lambda d: _edit(d, input_shape=[1, 28, 28]), "does not match")
    case("swapped", lambda d: _edit(d, files={**files, "encoder": "decoder.onnx"}), "does not match")
    case("garbage_onnx", lambda d: (d / "discriminator.onnx").write_bytes(b"\x00garbage"), "discriminator")

    def bad_op(d):
        node = helper.make_node("RandomNormalLike", ["latent"], ["real0"])
        red = helper.make_node("ReduceMean", ["real0"], ["real"], axes=[1], keepdims=1)
        g = helper.make_graph([node, red], "d", [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("real", TensorProto.FLOAT, ["N", 1])])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "discriminator.onnx"))
    case("bad_op", bad_op, "operators an autoencoder does not need")
    return cases


def test_bad_autoencoder_folders_are_one_line_errors(tmp_path):
    cases = _hostile_cases(tmp_path)
    cases["not_a_folder"] = (tmp_path / "nowhere", "not a folder")
    for name, (d, match) in cases.items():
        with pytest.raises(InputError, match=match) as exc:
            load_autoencoder(d)
        msg = str(exc.value)
        assert "\n" not in msg and str(d) in msg, (name, msg)


def test_bad_autoencoder_in_the_cli_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    cases = _hostile_cases(tmp_path)
    for name in ("dotdot", "symlink", "latent", "no_json"):
        d, match = cases[name]
        out = tmp_path / f"out_{name}"
        monkeypatch.setattr("sys.argv", ["onnxsal", "explain", str(MODEL), str(SAMPLE), "--limit", "1",
                                         "-m", "abele", "--autoencoder", str(d), "--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --autoencoder") and match in err and "\n" not in err, err
        assert not (out / "maps.npz").exists()


def test_bundled_fashion_autoencoder_record_matches_its_files():
    from onnxsal.data import fashion_mnist_arrays

    d = DATA / "aae_fashion"
    rec = json.loads((d / "autoencoder.json").read_text())
    ae = load_autoencoder(d)
    assert ae.latent == rec["latent"] == 8 and list(ae.input_shape) == [1, 28, 28]
    xr, _, _ = fashion_mnist_arrays("test")  # the test split: never seen in training
    x = (xr[:500].astype(np.float32) / 255)[:, None]
    mse = float(((ae.decode(ae.encode(x)) - x) ** 2).mean())
    assert abs(mse - rec["heldout"]["reconstruction_mse"]) < 0.005 and mse < 0.03
