"""Hostile names, folders, options and files at the CLI (issue 14): nothing computed is lost,
one line instead of a traceback, terminal-safe output, one bad file never stops a run.

Models are built with onnx.helper (see tests/test_hostile.py); the CLI runs in-process through
``onnxsal.cli.main``, exactly as the console script does.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_hostile import nan_for_dark_images, one_error_line, run_main, save, tiny


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))


def write_png(path: Path, seed: int = 0, hw: int = 8) -> Path:
    from skimage import io as skio

    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(path, (np.random.default_rng(seed).random((hw, hw, 3)) * 255).astype(np.uint8),
                check_contrast=False)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return save(tiny(), tmp_path / "m.onnx")


def explain(model, images, out, *extra):
    return run_main(["explain", model, *images, "--out", out, "-m", "vanilla,gradient_x_input",
                     "--device", "cpu", *extra])


def without_progress(stderr: str) -> str:
    """stderr without tqdm's progress bar (shown for more than four images)."""
    return "\n".join(ln for ln in stderr.splitlines() if not ln.startswith("explain:"))


def maps_in(out: Path) -> dict:
    with np.load(out / "maps.npz") as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# 6. nothing computed is lost


def test_math_text_in_labels_and_names_is_drawn_as_written(tmp_path, model):
    """matplotlib parses "$...$" as TeX: a label or file name like this used to fail the figure
    and, with it, the run (the maps were written only at the end)."""
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["$\\frac{$", "a$x^{$b", "$$", "plain"]))
    img = write_png(tmp_path / "in" / "x$\\frac{$y.png")
    code, _, err = explain(model, [img], tmp_path / "out", "--labels", labels)
    assert code == 0, err
    out = tmp_path / "out"
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["complete"] and not pred["failures"], pred["failures"]
    assert (out / pred["images"][0]["figure"]).stat().st_size > 0
    assert len(maps_in(out)) == 2


def test_a_255_byte_name_gets_a_short_hashed_file_name(tmp_path, model):
    long1 = "a" * 240 + "1.png"
    long2 = "a" * 240 + "2.png"  # the same first 240 characters: the hash tells them apart
    imgs = [write_png(tmp_path / "in" / long1, 0), write_png(tmp_path / "in" / long2, 1)]
    code, _, err = explain(model, imgs, tmp_path / "out")
    assert code == 0, err
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    figures = [p["figure"] for p in pred["images"]]
    assert len(set(figures)) == 2
    for f in figures:
        assert len(f.encode()) <= 130 and (tmp_path / "out" / f).is_file()
    assert len(maps_in(tmp_path / "out")) == 4


def test_a_non_utf8_file_name_is_escaped_in_json_figures_and_terminal(tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    write_png(Path(os.fsdecode(raw)))
    code, _, err = explain(model, [os.fsdecode(raw)], tmp_path / "out")
    assert code == 0, err
    text = (tmp_path / "out" / "predictions.json").read_bytes().decode("utf-8")  # valid UTF-8
    pred = json.loads(text)
    assert pred["images"][0]["image"].endswith("caf\\xe9.png")
    assert (tmp_path / "out" / pred["images"][0]["figure"]).is_file()


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path, model, monkeypatch):
    img = write_png(tmp_path / "a.png")
    (tmp_path / "file.txt").write_text("x")
    from onnxsal import engine

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(engine.Engine, "__init__", no_model)
    code, _, err = explain(model, [img], tmp_path / "file.txt" / "out")
    assert code == 2
    line = one_error_line(err)
    assert "under" in line and "file.txt" in line and "is a file" in line


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, model, monkeypatch):
    """Root may write anywhere, so the file system's refusal is simulated at the probe file."""
    import tempfile

    img = write_png(tmp_path / "a.png")
    (tmp_path / "ro").mkdir()
    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **k):
        if dir is not None and Path(dir).name == "ro":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, _, err = explain(model, [img], tmp_path / "ro" / "out")
    assert code == 2
    line = one_error_line(err)
    assert "not writable" in line and "Permission denied" in line
    assert not (tmp_path / "ro" / "out").exists()


def test_a_failing_figure_is_a_failure_line_and_every_map_is_kept(tmp_path, model, monkeypatch):
    from onnxsal import overlays

    imgs = [write_png(tmp_path / f"in/{k}.png", k) for k in range(3)]
    draw = overlays._draw

    def flaky(fig, axes, image, panels, title):
        if title.startswith(str(imgs[1])):
            raise RuntimeError("the font cache is broken")
        return draw(fig, axes, image, panels, title)

    monkeypatch.setattr(overlays, "_draw", flaky)
    code, _, err = explain(model, imgs, tmp_path / "out")
    assert code == 0, err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed:")]
    assert len(failed) == 1 and "1.png" in failed[0] and "figure not written" in failed[0]
    assert "Traceback" not in err
    assert sorted(maps_in(tmp_path / "out")) == sorted(f"{k}/{m}" for k in "012"
                                                       for m in ("vanilla", "gradient_x_input"))
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {"0.png", "2.png"}


def test_a_full_disk_is_one_line_and_the_maps_written_so_far_remain(tmp_path, model, monkeypatch):
    """The file system fills up while the second batch's maps are written: one line, the
    first batch's maps in maps.npz, its figures on disk, predictions.json says incomplete."""
    imgs = [write_png(tmp_path / f"in/{k:02d}.png", k) for k in range(10)]  # batches of 8
    real, parts = os.fsync, []

    def fsync(fd):
        if ".maps-parts-" in os.readlink(f"/proc/self/fd/{fd}"):
            parts.append(fd)
            if len(parts) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    code, _, err = explain(model, imgs, out)
    assert code == 2
    line = one_error_line(without_progress(err))
    assert "No space left on device" in line and "maps of the 8 images" in line
    assert len(maps_in(out)) == 16
    assert len(list(out.glob("*.png"))) == 8
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["complete"] is False and len(pred["images"]) == 8
    assert not list(out.glob(".*tmp"))


# ---------------------------------------------------------------------------------------------
# 8. terminal safety


ESC = "\x1b"


def test_model_strings_are_printed_with_control_characters_escaped(tmp_path):
    m = tiny()
    m.producer_name = f"{ESC}[2J{ESC}[31mfake\rok"
    m.graph.input[0].name = m.graph.node[0].input[0] = f"x{ESC}]0;title\x07"
    code, out, err = run_main(["inspect", save(m, tmp_path / "m.onnx")])
    assert code == 0, err
    assert ESC not in out and "\r" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b[31mfake\\rok" in out and "x\\x1b]0;title\\x07" in out


def test_error_lines_escape_control_characters(tmp_path):
    m = tiny()
    n = m.graph.node[1]
    n.domain, n.op_type = f"evil{ESC}[2J", "Op"
    m.opset_import.append(helper.make_opsetid(n.domain, 1))
    code, _, err = run_main(["inspect", save(m, tmp_path / "m.onnx")])
    assert code == 2
    line = one_error_line(err)
    assert ESC not in err and "evil\\x1b[2J" in line


def test_markdown_tables_escape_control_characters():
    from onnxsal.report import markdown_table

    text = markdown_table(["model"], [[f"a{ESC}[2J\nb|c"]])
    assert ESC not in text and "a\\x1b[2J\\nb\\|c" in text


# ---------------------------------------------------------------------------------------------
# 9. one bad file never stops a run


def test_a_bad_file_among_good_ones_is_listed_and_the_rest_explained(tmp_path, model):
    good = [write_png(tmp_path / "a.png", 0), write_png(tmp_path / "c.png", 2)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    code, _, err = explain(model, [good[0], bad, good[1]], tmp_path / "out")
    assert code == 0, err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed:")]
    assert len(failed) == 1 and "bad.png" in failed[0]
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(p["image"]).name for p in pred["images"]] == ["a.png", "c.png"]
    assert [Path(f["image"]).name for f in pred["failures"]] == ["bad.png"]


def test_a_single_bad_file_is_still_one_error(tmp_path, model):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    code, _, err = explain(model, [bad], tmp_path / "out")
    assert code == 2 and "bad.png" in one_error_line(err)


def test_compare_says_when_logits_are_nan(tmp_path):
    from onnxsal.compare import compare_models

    m = nan_for_dark_images()
    a, b = save(m, tmp_path / "a.onnx"), save(m, tmp_path / "b.onnx")
    x = np.full((4, 1, 6, 6), 0.2, np.float32)
    x[0] = 0.9  # one image with finite logits
    with np.errstate(all="raise"):  # no numpy warning on the way either
        rep = compare_models(a, b, x, [], device="cpu", out=tmp_path / "cmp")
    assert "NaN" in rep["verdict"] and "3 of 4" in rep["verdict"], rep["verdict"]
    assert "same top-1" not in rep["verdict"]
    assert rep["verdict"] in (tmp_path / "cmp" / "compare.md").read_text()


# ---------------------------------------------------------------------------------------------
# 7. one line, never a traceback


def _with_input(extra: onnx.ValueInfoProto, op: str) -> onnx.ModelProto:
    m = tiny()
    m.graph.input.append(extra)
    m.graph.node[0].input[0] = "xs"
    m.graph.node.insert(0, helper.make_node(op, ["x", extra.name], ["xs"], name="mix"))
    return m


def _resized(dims) -> onnx.ModelProto:
    m = tiny()
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, dims):
        if v is not None:
            d.dim_value = v
    return m


def _scalar_output() -> onnx.ModelProto:
    m = tiny()
    m.graph.node.append(helper.make_node("ReduceSum", ["logits"], ["s"], keepdims=0, name="sum"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    return m


def _nested_metadata() -> onnx.ModelProto:
    m = tiny()
    p = m.metadata_props.add()
    p.key, p.value = "onnxsal.preprocess", "[" * 100_000 + "]" * 100_000
    return m


BAD_MODELS = {
    "second image input": (lambda: _with_input(helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, ["N", 3, 8, 8]), "Add"), "besides the image 'x': y"),
    "second float input": (lambda: _with_input(helper.make_tensor_value_info(
        "scale", TensorProto.FLOAT, [1]), "Mul"), "besides the image 'x': scale"),
    # a size <= 0 is a dynamic axis (paddle2onnx writes -1): a channel count must be known
    "zero channels": (lambda: _resized([None, 0, None, None]), "dynamic channel count"),
    "absurd size": (lambda: _resized([None, None, 10**9, 10**9]), "values per image"),
    "scalar output": (_scalar_output, "output 's' is a scalar"),
    "nested preprocess metadata": (_nested_metadata, "nested too deeply"),
}


@pytest.mark.parametrize("kind, command", [
    (k, c) for k in sorted(BAD_MODELS) for c in ("inspect", "explain")
    # inspect reads no preprocessing, and reports a dynamic channel count as it is
    if not (k in ("nested preprocess metadata", "zero channels") and c == "inspect")])
def test_unusable_model_inputs_and_outputs_are_one_line(tmp_path, kind, command):
    build, expected = BAD_MODELS[kind]
    path = save(build(), tmp_path / "m.onnx")
    args = ["inspect", path] if command == "inspect" else \
        ["explain", path, write_png(tmp_path / "a.png"), "--out", tmp_path / "out", "-m", "vanilla"]
    code, _, err = run_main(args)
    assert code == 2, err
    assert expected in one_error_line(err)


def test_nested_labels_metadata_is_ignored_like_any_invalid_labels(tmp_path):
    m = tiny()
    p = m.metadata_props.add()
    p.key, p.value = "onnxsal.labels", "[" * 100_000 + "]" * 100_000
    from onnxsal.preprocess import labels_from_model

    assert labels_from_model(m) is None


def test_a_deeply_nested_labels_file_is_one_line(tmp_path, model):
    labels = tmp_path / "labels.json"
    labels.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = explain(model, [write_png(tmp_path / "a.png")], tmp_path / "out", "--labels", labels)
    assert code == 2
    assert "labels file" in one_error_line(err) and "nested too deeply" in err


def test_non_utf8_model_and_image_names_in_benchmark_sanity_compare(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_png(Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")), 0)
    write_png(folder / "ok.png", 1)
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/t\xe9.onnx")
    save(tiny(), Path(odd))
    plain = save(tiny(), tmp_path / "plain.onnx")
    runs = {"bench": ["benchmark", plain, odd, "--data", folder, "--metric", "allegiance",
                      "-m", "vanilla", "--quiet"],
            "sanity": ["sanity", odd, "--data", folder, "-m", "vanilla", "--quiet"],
            "compare": ["compare", plain, odd, "--data", folder, "-m", "vanilla"]}
    for name, args in runs.items():
        code, out, err = run_main([*args, "--out", tmp_path / name])
        assert code == 0, (name, err)
        for f in (tmp_path / name).glob("*.md"):
            f.read_bytes().decode("utf-8")  # valid UTF-8
    assert "t\\xe9" in (tmp_path / "bench" / "results.md").read_text()


@pytest.mark.parametrize("args, option", [
    (["benchmark", "M", "--data", "D", "--out", "O", "--seed", "-1"], "--seed"),
    (["benchmark", "M", "--data", "D", "--out", "O", "--threads", "100000"], "--threads"),
    (["sanity", "M", "--data", "D", "--out", "O", "--threads", "0"], "--threads"),
    (["augment", "M", "-o", "O", "--epsilon", "nan"], "--epsilon"),
    (["compare", "M", "M", "--data", "D", "--out", "O", "--atol", "inf"], "--atol"),
    (["compare", "M", "M", "--data", "D", "--out", "O", "--min-spearman", "nan"], "--min-spearman"),
    (["explain", "M", "D", "--out", "O", "--limit", "0"], "--limit"),
    (["sanity", "M", "--data", "D", "--out", "O", "--seed", str(2**70)], "--seed"),
])
def test_bad_option_values_are_one_line(tmp_path, args, option):
    model = save(tiny(), tmp_path / "m.onnx")
    img = write_png(tmp_path / "a.png")
    subst = {"M": model, "D": img, "O": tmp_path / "out"}
    code, _, err = run_main([subst.get(a, a) for a in args])
    assert code == 2
    line = one_error_line(err)
    assert option in line


def test_onnxruntime_log_lines_do_not_come_before_the_error(tmp_path, capfd):
    """onnxruntime logs a failing node in colour on the process's stderr (C++), before the
    exception reaches onnxsal; sessions log at level 4 (fatal only) now."""
    from onnx import numpy_helper

    m = tiny()  # the convolution's weights want 5 channels, the image has 3
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((4, 5, 3, 3), np.float32), "W"))
    path = save(m, tmp_path / "m.onnx")
    code, _, err = run_main(["explain", path, write_png(tmp_path / "a.png"), "--out",
                             tmp_path / "out", "-m", "vanilla", "--device", "cpu"])
    native = capfd.readouterr().err
    assert code == 2 and "onnxruntime failed to run the model" in one_error_line(err)
    assert "onnxruntime" not in native and ESC not in native, native


def test_numpy_warnings_are_not_printed(tmp_path):
    """Logits of +-Inf: onnxsal lists the failures itself; numpy's RuntimeWarnings about the
    same values are not shown (even with warnings switched on)."""
    import warnings

    from onnx import numpy_helper

    m = tiny(c=1, hw=6, classes=3)
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("Div", ["pre", "zero"], ["logits"], name="div"))
    path = save(m, tmp_path / "inf.onnx")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run_main(["explain", path, write_png(tmp_path / "a.png", hw=6), "--out",
                                 tmp_path / "out", "-m", "vanilla,occlusion", "--device", "cpu"])
    assert code == 0, err
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]
    assert "Warning" not in err, err
    assert "logits are NaN or Inf" in err


def _module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("case, expected", [
    ("import", "importing module 'hostile_mod_import' failed (RuntimeError: boom at import)"),
    ("args", "calling build() failed (TypeError"),
    ("path", "not a file path"),
])
def test_convert_torch_sources_that_fail_are_one_line(tmp_path, monkeypatch, case, expected):
    name = f"hostile_mod_{case}"
    body = {"import": "raise RuntimeError('boom at import')\n",
            "args": "def build(width):\n    return None\n",
            "path": "def build():\n    return None\n"}[case]
    _module(tmp_path, monkeypatch, name, body)
    source = f"{name}.py:build" if case == "path" else f"{name}:build"
    code, _, err = run_main(["convert", "torch", source, "-o", tmp_path / "o.onnx",
                             "--input-shape", "3,8,8"])
    assert code == 2
    assert expected in one_error_line(err)


def test_a_dotted_torch_source_is_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "hostile_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
        "torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_main(["convert", "torch", "hostile_pkg.nets:build", "-o",
                               tmp_path / "o.onnx", "--input-shape", "3,8,8"])
    assert code == 0, err
    assert "top-1 agreement 100%" in out and err == ""


def test_framework_banners_are_silenced_during_convert(capfd):
    """TensorFlow prints its oneDNN/absl banners from C++ straight to the process's stderr."""
    import sys
    import warnings

    from converters.common import quiet_frameworks

    with quiet_frameworks():
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\n")
        print("WARNING: All log messages before absl::InitializeLog()", file=sys.stderr)
        warnings.warn("np.object", FutureWarning, stacklevel=2)
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_a_negative_declared_size_is_a_dynamic_axis(tmp_path):
    """-5 as a height is read as a dynamic axis, like paddle2onnx's -1: explain takes the
    images' own size and says so."""
    path = save(_resized([None, None, -5, None]), tmp_path / "m.onnx")
    code, out, err = run_main(["inspect", path])
    assert code == 0, err
    assert "None" in next(line for line in out.splitlines() if line.startswith("input"))
    code, _, err = run_main(["explain", path, write_png(tmp_path / "a.png"), "--out",
                             tmp_path / "out", "-m", "vanilla"])
    assert code == 0, err
    assert "the images' own size 8x8 is used" in err
