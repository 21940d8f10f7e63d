"""Reliability and security (issue 8): hostile and broken models, bad inputs, non-finite
values, several outputs, integer inputs, fixed batch sizes, Ctrl-C, and the one-line errors.

Models are built here with onnx.helper (tiny and fast). The CLI cases go through
``onnxsal.cli.main`` exactly as the console script does (in-process, for speed; a few run in a
subprocess to see the real process exit code and ``--debug`` traceback).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers


def tiny(batch="N", c=3, hw=8, classes=4, seed=0, elem=TensorProto.FLOAT, opset=17) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul: a valid little classifier."""
    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((r.normal(size=(4, c, 3, 3)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(4, np.float32), "B"),
             numpy_helper.from_array(r.normal(size=(4, classes)).astype(np.float32), "Wf")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "Wf"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", elem, [batch, c, hw, hw])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def nan_for_dark_images(c=1, hw=6) -> onnx.ModelProto:
    """logits = log(mean(x) - 0.5) * [1, -1, 0.5]: NaN logits exactly for images whose mean
    pixel is below 0.5 (the score a Log of a negative number gives)."""
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array([[1.0, -1.0, 0.5]], np.float32), "Wc"),
             numpy_helper.from_array(np.array([0.0, 0.1, 0.2], np.float32), "bc")]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["m4"]),
             helper.make_node("ReduceMean", ["m4"], ["m"], axes=[1], keepdims=0),
             helper.make_node("Flatten", ["m"], ["mf"]),
             helper.make_node("Sub", ["mf", "half"], ["d"]),
             helper.make_node("Log", ["d"], ["l"]),
             helper.make_node("MatMul", ["l", "Wc"], ["z"]),
             helper.make_node("Add", ["z", "bc"], ["logits"])]
    g = helper.make_graph(nodes, "nanlog", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, hw, hw])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def nan_gradient_model(hw=6) -> onnx.ModelProto:
    """Finite logits, NaN gradients: Sqrt after Relu (d sqrt / d u at u = 0 is Inf, times the
    Relu's zero derivative gives NaN) wherever a pixel is below 0.5."""
    m = tiny(c=1, hw=hw, classes=3)
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    g.node.insert(0, helper.make_node("Sub", ["x", "half"], ["xs"], name="shift"))
    g.node.insert(1, helper.make_node("Relu", ["xs"], ["xr"], name="relu0"))
    g.node.insert(2, helper.make_node("Sqrt", ["xr"], ["xq"], name="sqrt"))
    g.node[3].input[0] = "xq"
    onnx.checker.check_model(m)
    return m


def run_main(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``onnxsal.cli.main`` with these arguments."""
    from onnxsal import cli

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["onnxsal", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def save(m: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from skimage import io as skio

    p = tmp_path_factory.mktemp("img") / "a.png"
    skio.imsave(p, (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8),
                check_contrast=False)
    return p


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# 1. untrusted models: one clear error for inspect, augment and explain


def _external(m: onnx.ModelProto, location: str, name_index: int = 0) -> onnx.ModelProto:
    t = m.graph.initializer[name_index]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "432")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return m


def _h_external_absolute(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    return save(_external(m, str((d.parent / "secret.bin").resolve())), p)


def _h_external_dotdot(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    return save(_external(m, "../secret.bin"), p)


def _h_external_symlink(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    link = d / "weights.bin"
    if not link.exists():
        os.symlink(d.parent / "secret.bin", link)
    return save(_external(m, "weights.bin"), p)


def _h_external_huge_claim(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    (d / "w.bin").write_bytes(np.zeros(108, np.float32).tobytes())
    m = _external(m, "w.bin")
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([1 << 20, 1 << 20])
    return save(m, p)


def _h_external_short_file(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    (d / "short.bin").write_bytes(b"\0" * 16)
    return save(_external(m, "short.bin"), p)


def _h_custom_domain(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    n = m.graph.node[1]
    n.domain, n.op_type = "com.evil", "Pwn"
    m.opset_import.append(helper.make_opsetid("com.evil", 1))
    return save(m, p)


def _h_unparsable(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    p.write_bytes(b"not a protobuf \xff\xfe\x00" * 20)
    return p


def _h_truncated(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    raw = m.SerializeToString()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _h_empty_file(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _h_no_image_input(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    dims = m.graph.input[0].type.tensor_type.shape
    del dims.dim[2:]
    return save(m, p)


def _h_integer_input(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    return save(tiny(elem=TensorProto.UINT8), p)


def _h_huge_tensor_claim(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    t = m.graph.initializer[2]
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 20])
    return save(m, p)


def _h_tensor_data_mismatch(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.initializer[0].data_type = TensorProto.FLOAT16
    return save(m, p)


def _h_cycle(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.node[0].input[0] = "r"  # conv reads relu's output, relu reads conv's
    return save(m, p)


def _h_recursive_function(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    """The graph calls its own function, which calls itself."""
    m.opset_import.append(helper.make_opsetid("my.lib", 1))
    body = [helper.make_node("Loopy", ["a"], ["b"], domain="my.lib")]
    m.functions.append(helper.make_function("my.lib", "Loopy", ["a"], ["b"], body,
                                            [helper.make_opsetid("", 17), helper.make_opsetid("my.lib", 1)]))
    m.graph.node[1].CopyFrom(helper.make_node("Loopy", ["c"], ["r"], name="relu", domain="my.lib"))
    return save(m, p)


def _h_dangling_name(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.node[2].input[0] = "nowhere"
    return save(m, p)


def _h_duplicate_output_name(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.node[1].output[0] = "c"
    return save(m, p)


def _h_duplicate_node_name(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.node[2].name = "conv"
    return save(m, p)


def _h_duplicate_initializer(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "W"))
    return save(m, p)


def _h_opset_from_the_future(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.opset_import[0].version = 99
    return save(m, p)


def _h_no_float_output(m: onnx.ModelProto, d: Path, p: Path) -> Path:
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    return save(m, p)


_HOSTILE_BUILDERS = {
    "external_absolute": _h_external_absolute,
    "external_dotdot": _h_external_dotdot,
    "external_symlink": _h_external_symlink,
    "external_huge_claim": _h_external_huge_claim,
    "external_short_file": _h_external_short_file,
    "custom_domain": _h_custom_domain,
    "unparsable": _h_unparsable,
    "truncated": _h_truncated,
    "empty_file": _h_empty_file,
    "no_image_input": _h_no_image_input,
    "integer_input": _h_integer_input,
    "huge_tensor_claim": _h_huge_tensor_claim,
    "tensor_data_mismatch": _h_tensor_data_mismatch,
    "cycle": _h_cycle,
    "recursive_function": _h_recursive_function,
    "dangling_name": _h_dangling_name,
    "duplicate_output_name": _h_duplicate_output_name,
    "duplicate_node_name": _h_duplicate_node_name,
    "duplicate_initializer": _h_duplicate_initializer,
    "opset_from_the_future": _h_opset_from_the_future,
    "no_float_output": _h_no_float_output,
}


def _hostile(kind: str, d: Path) -> Path:
    """Write the hostile model `kind` into folder d; return its path."""
    return _HOSTILE_BUILDERS[kind](tiny(), d, d / f"{kind}.onnx")


HOSTILE = {  # kind -> words the one error line must contain
    "external_absolute": "outside the model's folder: refused",
    "external_dotdot": "outside the model's folder: refused",
    "external_symlink": "a link leading outside the model's folder: refused",
    "external_huge_claim": "beyond the 4 GiB limit: refused",
    "external_short_file": "truncated or inconsistent",
    "custom_domain": "custom operator domains are not supported: com.evil::Pwn",
    "unparsable": "not a readable ONNX file",
    "truncated": "not a readable ONNX file",
    "empty_file": "the ONNX graph has no nodes",
    "no_image_input": "no float image input of rank 4",
    "integer_input": "gradients cannot flow into integer pixels",
    "huge_tensor_claim": "too small for the declared shape",
    "tensor_data_mismatch": "does not hold data of its shape and type",
    "cycle": "topologically sorted",
    "recursive_function": "Model-local functions must not be recursive",
    "dangling_name": "input 'nowhere'",
    "duplicate_output_name": "single static assignment",
    "duplicate_node_name": "two nodes are named 'conv'",
    "duplicate_initializer": "initializer name is not unique",
    "opset_from_the_future": "opset 99 is newer than this onnx supports",
    "no_float_output": "the model has no float output",
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "secret.bin").write_bytes(np.zeros(108, np.float32).tobytes())
    d = root / "models"
    d.mkdir()
    return d


@pytest.mark.parametrize("command", ["inspect", "augment", "explain"])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_model_gives_one_error_line(kind, command, hostile_dir, image, tmp_path):
    path = _hostile(kind, hostile_dir)
    out = tmp_path / "out.onnx"
    args = {"inspect": ["inspect", path],
            "augment": ["augment", path, "-o", out],
            "explain": ["explain", path, image, "--out", tmp_path / "ex", "-m", "vanilla",
                        "--device", "cpu"]}[command]
    code, stdout, stderr = run_main(args)
    assert code == 2, (stdout, stderr)
    line = one_error_line(stderr)
    assert HOSTILE[kind] in line, line
    assert not out.exists() and not (tmp_path / "ex").exists()


def test_load_model_refuses_before_reading_outside(hostile_dir, monkeypatch):
    """The external-data check runs before onnx reads any external file."""
    import onnx.external_data_helper as edh

    from onnxsal.model import load_model

    def boom(*a, **k):
        raise AssertionError("external data were read")

    monkeypatch.setattr(edh, "load_external_data_for_tensor", boom)
    for kind in ("external_absolute", "external_dotdot", "external_symlink", "external_huge_claim"):
        with pytest.raises(ModelError):
            load_model(_hostile(kind, hostile_dir))


def test_external_data_inside_the_folder_still_loads(tmp_path):
    from onnxsal.model import load_model

    p = tmp_path / "m.onnx"
    onnx.save(tiny(), str(p), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    m = load_model(p)
    assert numpy_helper.to_array(m.graph.initializer[0]).shape == (4, 3, 3, 3)


def _calls(text: str, fn: str) -> list[str]:
    """The full text of every call ``fn(...)`` in ``text`` (balanced parentheses)."""
    out = []
    for m in re.finditer(r"(?<![\w.])" + re.escape(fn) + r"\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        out.append(text[m.start():i + 1])
    return out


def test_nothing_unpickles_untrusted_data():
    """No pickle, no torch.load without weights_only=True, np.load only with
    allow_pickle=False, no custom-op libraries, in the package, converters and scripts."""
    bad = []
    for base in ("onnxsal", "converters", "benchmarks"):
        for f in sorted((ROOT / base).rglob("*.py")):
            text = f.read_text(encoding="utf-8")
            rel = f.relative_to(ROOT)
            for pat in (r"\bimport pickle\b", r"\bpickle\.load", r"\bcloudpickle\b", r"\bjoblib\.load",
                        r"register_custom_ops_library", r"\bdill\b", r"yaml\.load\(",
                        r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
                if re.search(pat, text):
                    bad.append(f"{rel}: {pat}")
            for fn, needs in (("torch.load", "weights_only=True"), ("np.load", "allow_pickle=False"),
                              ("numpy.load", "allow_pickle=False")):
                for call in _calls(text, fn):
                    if needs not in call:
                        bad.append(f"{rel}: {call}")
    assert not bad, bad


def test_debug_shows_the_traceback_and_plain_mode_one_line(hostile_dir):
    path = _hostile("unparsable", hostile_dir)
    plain = subprocess.run([sys.executable, "-m", "onnxsal.cli", "inspect", str(path)],
                           capture_output=True, text=True)
    assert plain.returncode == 2
    assert one_error_line(plain.stderr).startswith("error: ")
    debug = subprocess.run([sys.executable, "-m", "onnxsal.cli", "--debug", "inspect", str(path)],
                           capture_output=True, text=True)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "onnxsal.errors.ModelError" in debug.stderr and "not a readable ONNX file" in debug.stderr


# ---------------------------------------------------------------------------------------------
# 2. bad inputs


def test_explain_goes_on_past_bad_images_and_lists_them(tmp_path, image):
    from skimage import io as skio

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    skio.imsave(folder / "rgb.png", (rng.random((8, 8, 3)) * 255).astype(np.uint8), check_contrast=False)
    skio.imsave(folder / "grey.png", (rng.random((10, 10)) * 255).astype(np.uint8), check_contrast=False)
    skio.imsave(folder / "rgba.png", (rng.random((8, 8, 4)) * 255).astype(np.uint8), check_contrast=False)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    x = rng.random((3, 8, 8, 3)).astype(np.float32)
    x[1, 2, 3, 0] = np.nan
    x[2, 0, 0, 1] = np.inf
    np.savez(tmp_path / "arrays.npz", x=x)
    model = save(tiny(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["explain", model, folder, tmp_path / "arrays.npz", "--out", out,
                                     "-m", "vanilla,active", "--device", "cpu"])
    assert code == 0, stderr
    failed = sorted(ln.split(": ")[1] for ln in stderr.splitlines() if ln.startswith("failed: "))
    assert failed == ["corrupt.png", "empty.jpg", "x[1]", "x[2]"], stderr
    assert "grey converted to RGB" in stderr and "alpha channel dropped" in stderr
    assert "resized from 10x10 to 8x8" in stderr
    pred = json.loads((out / "predictions.json").read_text())
    assert sorted(p["image"] for p in pred["images"]) == ["grey.png", "rgb.png", "rgba.png", "x[0]"]
    with np.load(out / "maps.npz", allow_pickle=False) as z:
        assert len(z.files) == 8 and all(np.isfinite(z[k]).all() for k in z.files)
    reasons = {f["image"]: f["error"] for f in pred["failures"]}
    assert "NaN" in reasons["x[1]"] and "Inf" in reasons["x[2]"]


def test_nan_logits_are_reported_per_image_and_never_averaged(tmp_path):
    from onnxsal.benchmark import run_benchmark
    from onnxsal.data import Dataset

    rng = np.random.default_rng(2)
    bright = 0.75 + 0.25 * rng.random((6, 1, 6, 6))
    dark = 0.2 * rng.random((4, 1, 6, 6))
    x = np.concatenate([bright[:3], dark[:2], bright[3:], dark[2:]]).astype(np.float32)
    names = [f"img{i}" for i in range(len(x))]
    data = Dataset(x, None, names, "synthetic")
    model = save(nan_for_dark_images(), tmp_path / "nan.onnx")
    res = run_benchmark([str(model)], data, ["vanilla"], metric="allegiance", out_dir=tmp_path / "b",
                        device="cpu", progress=False, shard_size=4)
    r = res["results"][0]
    dark_names = {"img3", "img4", "img8", "img9"}
    assert r["images"] == 10 and r["valid_images"] == 6
    assert {f["name"] for f in r["failures"]} == dark_names
    assert all("non-finite logits on the clean image" in f["error"] for f in r["failures"])
    # the curves come from the six bright images only: black deletion darkens them, and an image
    # whose logits turn NaN at some fraction is a failure too, so a finite curve means no NaN
    # was averaged in
    for mode in ("black", "white"):
        assert all(np.isfinite(v) for v in r["curves"][mode]), r["curves"]
    assert "img3" in (tmp_path / "b" / "results.md").read_text()
    # explain lists them too
    from onnxsal.engine import Engine
    from onnxsal.explain import run_explain

    np.savez(tmp_path / "d.npz", x=x)
    ex = run_explain(Engine(str(model), device="cpu"), [str(tmp_path / "d.npz")], ["vanilla"],
                     tmp_path / "ex", progress=False)
    assert {f["image"] for f in ex.failures} == {"x[3]", "x[4]", "x[8]", "x[9]"}
    assert all("NaN or Inf" in f["error"] for f in ex.failures)


def test_nan_gradients_are_per_image_failures_in_the_benchmark(tmp_path):
    from onnxsal.benchmark import run_benchmark
    from onnxsal.data import Dataset

    rng = np.random.default_rng(3)
    x = (0.55 + 0.45 * rng.random((5, 1, 6, 6))).astype(np.float32)  # every pixel above 0.5
    x[[1, 3], 0, 2, 2] = 0.1  # one pixel below: NaN gradient there, logits still finite
    model = save(nan_gradient_model(), tmp_path / "g.onnx")
    from onnxsal.engine import Engine

    logits, grad = Engine(str(model), device="cpu").gradient(x)
    assert np.isfinite(logits).all()
    assert [bool(np.isfinite(g).all()) for g in grad] == [True, False, True, False, True]
    res = run_benchmark([str(model)], Dataset(x, None, [f"i{i}" for i in range(5)], "s"),
                        ["vanilla"], metric="allegiance", out_dir=tmp_path / "b", device="cpu",
                        progress=False)
    r = res["results"][0]
    assert r["valid_images"] == 3
    assert {f["name"]: f["error"] for f in r["failures"]} == {
        "i1": "saliency map contains NaN or Inf", "i3": "saliency map contains NaN or Inf"}


def test_several_outputs_need_output_name(tmp_path, image):
    m = tiny()
    m.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 4]))
    path = save(m, tmp_path / "two.onnx")
    code, _, err = run_main(["inspect", path])
    assert code == 2 and "choose one with --output" in one_error_line(err)
    code, out, err = run_main(["inspect", path, "--output", "logits", "--json"])
    assert code == 0, err
    assert json.loads(out)["logits"]["output"] == "logits"
    code, _, err = run_main(["explain", path, image, "--out", tmp_path / "e", "-m", "vanilla",
                             "--output", "f", "--device", "cpu"])
    assert code == 0, err
    code, _, err = run_main(["explain", path, image, "--out", tmp_path / "e2", "-m", "vanilla",
                             "--output", "nope", "--device", "cpu"])
    assert code == 2 and "no output 'nope'; outputs: logits, f" in one_error_line(err)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_fixed_batch_models_take_any_number_of_images(batch):
    """A model exported with a fixed batch runs in chunks of exactly that size; results equal
    the dynamic-batch model's for 5 images (logits, gradients, all classes, intermediates)."""
    from onnxsal.engine import Engine

    x = np.random.default_rng(4).random((5, 3, 8, 8), dtype=np.float32)
    dyn = Engine(tiny(), device="cpu", use_disk_cache=False)
    fix = Engine(tiny(batch=batch), device="cpu", use_disk_cache=False)
    assert fix.batch_size() == batch and fix.batch_size(seeds=4) == batch
    np.testing.assert_allclose(fix.logits(x), dyn.logits(x), rtol=1e-6, atol=1e-6)
    _, g1 = fix.gradient(x)
    _, g0 = dyn.gradient(x)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)
    c1 = np.concatenate([g for _, g in fix.class_gradients(x, chunk=3)])
    c0 = np.concatenate([g for _, g in dyn.class_gradients(x, chunk=3)])
    np.testing.assert_allclose(c1, c0, rtol=1e-5, atol=1e-6)
    seeds = np.random.default_rng(5).normal(size=(2, 5, 4)).astype(np.float32)
    v1 = fix.vjp(x, seeds, wrt=["r"])
    v0 = dyn.vjp(x, seeds, wrt=["r"])
    np.testing.assert_allclose(v1.grads["r"], v0.grads["r"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v1.values["r"], v0.values["r"], rtol=1e-6, atol=1e-6)


def test_fixed_batch_model_through_explain(tmp_path, image):
    path = save(tiny(batch=1), tmp_path / "b1.onnx")
    code, out, err = run_main(["explain", path, image, image, image, "--out", tmp_path / "e",
                               "-m", "vanilla,active,gradcam,occlusion", "--device", "cpu"])
    assert code == 0, err
    with np.load(tmp_path / "e" / "maps.npz", allow_pickle=False) as z:
        assert len(z.files) == 12


def test_onnxruntime_run_failure_is_a_model_error():
    """A model that loads but fails when run (a Reshape to an impossible shape) gives a
    ModelError naming onnxruntime, not onnxruntime's own exception."""
    from onnxsal.engine import Engine

    m = tiny()
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape"))
    m.graph.node[3].op_type = "Reshape"
    m.graph.node[3].input.append("bad_shape")
    with pytest.raises(ModelError, match="onnxruntime"):
        eng = Engine(m, device="cpu", use_disk_cache=False)
        eng.logits(np.zeros((1, 3, 8, 8), np.float32))


# ---------------------------------------------------------------------------------------------
# 3. no lost work: Ctrl-C leaves a consistent folder, and the rerun gives the same results


def _no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_ctrl_c_in_the_benchmark_then_resume(tmp_path, monkeypatch):
    from onnxsal import benchmark as bm
    from onnxsal.data import Dataset

    x = np.random.default_rng(6).random((12, 3, 8, 8)).astype(np.float32)
    y = np.arange(12) % 4
    data = Dataset(x, y, [f"i{i}" for i in range(12)], "synthetic")
    model = str(save(tiny(), tmp_path / "m.onnx"))
    kw = dict(methods=["vanilla", "positive"], metric="accuracy", device="cpu", progress=False,
              shard_size=4)
    ref = bm.run_benchmark([model], data, out_dir=tmp_path / "ref", **kw)

    real = bm.default_maps_many
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bm, "default_maps_many", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        bm.run_benchmark([model], data, out_dir=out, **kw)
    # consistent: finished shards only, each one readable; no results yet; no temporary files
    shards = sorted(out.rglob("*.npz"))
    assert len(shards) == 4  # 2 slices x 2 methods finished before the interruption
    for s in shards:
        with np.load(s, allow_pickle=False) as z:
            assert {"reference", "errors"} <= set(z.files)
    assert not (out / "results.json").exists() and not _no_temp_files(out)
    monkeypatch.setattr(bm, "default_maps_many", real)
    again = bm.run_benchmark([model], data, out_dir=out, **kw)
    assert again["timing"]["shards_computed_this_run"] == 2
    strip = lambda d: {k: v for k, v in d.items() if k != "timing"}  # noqa: E731
    ref_json = json.loads((tmp_path / "ref" / "results.json").read_text())
    new_json = json.loads((out / "results.json").read_text())
    for d in (ref_json, new_json):
        d.pop("timing")
        for m in d["models"]:
            m.pop("shards")
    assert ref_json == new_json
    assert (tmp_path / "ref" / "curves.csv").read_bytes() == (out / "curves.csv").read_bytes()
    assert strip(ref)["results"] == strip(again)["results"]


def test_ctrl_c_in_the_cli_prints_one_line(tmp_path, monkeypatch):
    from onnxsal import benchmark as bm

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "default_maps_many", interrupted)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32))
    model = save(tiny(), tmp_path / "m.onnx")
    code, _, err = run_main(["benchmark", model, "--data", tmp_path / "d.npz", "--metric", "allegiance",
                             "--out", tmp_path / "o", "--quiet", "--device", "cpu", "-m", "vanilla"])
    assert code == 130
    assert "Traceback" not in err and "run the same command again to resume" in err
    assert not _no_temp_files(tmp_path / "o")


def test_ctrl_c_in_sanity_then_resume(tmp_path, monkeypatch):
    from onnxsal import sanity_run

    m = tiny(seed=3)
    x = np.random.default_rng(7).random((4, 3, 8, 8)).astype(np.float32)
    kw = dict(methods=["vanilla", "gradient_x_input"], device="cpu", seed=0, plots=False)
    ref = sanity_run.run_sanity(m, x, out=tmp_path / "ref", **kw)
    real = sanity_run.randomize
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sanity_run, "randomize", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        sanity_run.run_sanity(m, x, out=out, **kw)
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step_000.npz", "step_001.npz"]
    assert not (out / "sanity.json").exists() and not _no_temp_files(out)
    rerun = []

    def counting(*a, **k):
        rerun.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sanity_run, "randomize", counting)
    again = sanity_run.run_sanity(m, x, out=out, **kw)
    assert len(ref["steps"]) == 3 and len(rerun) == 1  # only the step not finished before
    assert json.loads((out / "sanity.json").read_text()) == json.loads((tmp_path / "ref" / "sanity.json").read_text())
    assert again["verdicts"] == ref["verdicts"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    """Results are written to a temporary file and renamed: an interruption while writing
    leaves the previous file whole and no temporary file."""
    from onnxsal import report

    path = tmp_path / "results.json"
    report.atomic_write_json(path, {"run": 1})

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        report.atomic_write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert not _no_temp_files(tmp_path)


def test_line_breaks_in_hostile_names_stay_on_one_line(tmp_path):
    m = tiny()
    n = m.graph.node[1]
    n.domain, n.op_type = "evil\ndomain", "Two\nLines"
    m.opset_import.append(helper.make_opsetid("evil\ndomain", 1))
    code, _, err = run_main(["inspect", save(m, tmp_path / "nl.onnx")])
    assert code == 2
    assert "evil domain::Two Lines" in one_error_line(err)


def test_out_of_memory_is_one_line(tmp_path, monkeypatch):
    import onnxsal.inspect

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 288. MiB")

    monkeypatch.setattr(onnxsal.inspect, "summarize", no_memory)
    code, _, err = run_main(["inspect", save(tiny(), tmp_path / "m.onnx")])
    assert code == 2 and "out of memory (Unable to allocate 288. MiB)" in one_error_line(err)


@pytest.mark.parametrize("declared", [0, 9])
def test_a_lying_class_count_is_not_believed(declared, tmp_path, image):
    """The output claims 0 or 9 classes; the model gives 4: a file is refused with the
    disagreement named, and an in-memory model's engine counts what the model gives."""
    from onnxsal.engine import Engine

    m = tiny()
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = declared
    assert Engine(m, device="cpu", use_disk_cache=False).num_classes == 4
    path = save(m, tmp_path / "lie.onnx")
    for args in (["inspect", path], ["augment", path, "-o", tmp_path / "a.onnx"],
                 ["explain", path, image, "--out", tmp_path / "e", "-m", "active", "--device", "cpu"]):
        code, _, err = run_main(args)
        assert code == 2
        line = one_error_line(err)
        assert "declared input/output shapes or types disagree with the graph" in line
        assert f"(4) vs ({declared})" in line and "node name: fc" in line
