"""onnxsal audit: the report's numbers against onnxruntime directly, resuming, masks, escaping,
and the review file (folded back, and refused in one line when it is wrong)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxsal.cli import cli, main

DATA = Path(__file__).parent / "data"
MODEL = DATA / "digits_cnn.onnx"
SAMPLE = DATA / "digits_sample.npz"
SMALL = ["--methods", "vanilla,gradcam", "--per-class", "1", "--eval-images", "10",
         "--sanity-images", "4", "--max-steps", "2", "--shortcut-images", "200", "--quiet",
         "--metric", "sparseness,irof,faithfulness-correlation,pointing-game,input-invariance,random-logit"]


def _audit(args):
    res = CliRunner().invoke(cli, ["audit", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "out"
    _audit([str(MODEL), "--data", str(SAMPLE), "--out", str(out), *SMALL])
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "audit.json").read_text())


def test_accuracy_and_confusion_match_onnxruntime(audited):
    r = _report(audited)
    z = np.load(SAMPLE)
    x, y = z["x"].astype(np.float32) / 255.0, z["y"]
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(axis=1)
    cm = np.zeros((10, 10), int)
    np.add.at(cm, (y, pred), 1)
    assert r["predictions"]["confusion"] == cm.tolist()
    assert r["predictions"]["accuracy"] == pytest.approx((pred == y).mean())
    assert r["predictions"]["correct"] == int((pred == y).sum())
    # the sample: per class one correct and (where there is one) one wrong image, true to the model
    for it in r["samples"]["items"]:
        assert it["pred"] == int(pred[it["image"]]) and it["label"] == int(y[it["image"]])
        assert it["correct"] == (pred[it["image"]] == y[it["image"]])
    wrong = {int(c) for c in y[pred != y]}
    assert {it["class"] for it in r["samples"]["items"] if not it["correct"]} == wrong


def test_sections_come_from_the_drivers(audited):
    r = _report(audited)
    bench = json.loads((audited / "benchmark" / "results.json").read_text())
    assert [row["auc"] for row in r["benchmark"]["rows"]] == [row["auc"] for row in bench["results"]]
    sanity = json.loads((audited / "sanity" / "sanity.json").read_text())
    assert r["sanity"]["verdicts"] == sanity["verdicts"]
    assert r["model"]["gradient_source"] == bench["models"][0]["gradients"]
    # metrics needing masks or options are skipped with a reason; the others ran
    skipped = {s["metric"]: s["reason"] for s in r["benchmark"]["skipped"]}
    assert "masks" in skipped["pointing-game"] and "explain_shifted" in skipped["input-invariance"]
    assert "explain_class" in skipped["random-logit"] and len(skipped) == 3
    ran = set(r["benchmark"]["rows"][0]["metrics"])
    assert ran == {"sparseness", "irof", "faithfulness-correlation"}
    assert r["benchmark"]["images"] == 10 and r["sanity"]["images"] == 4
    html = (audited / "report.html").read_text()
    for anchor in ("summary", "model", "accuracy", "maps", "faithfulness", "robustness",
                   "localisation", "sanity", "shortcuts", "review", "reproduce"):
        assert f'id="{anchor}"' in html
    assert "http://" not in html and "https://" not in html and "src=\"assets/" not in html


def test_rerun_reuses_every_part(audited, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(audited, out)
    before = _report(out)
    _audit([str(MODEL), "--data", str(SAMPLE), "--out", str(out), *SMALL])
    after = _report(out)
    assert after["parts"]["computed"] == []
    assert set(after["parts"]["reused"]) >= {"predictions", "sample_maps", "shortcut_maps"}
    for key in ("predictions", "benchmark", "sanity", "shortcuts", "id"):
        assert after[key] == before[key], key


def test_masks_give_localisation(tmp_path):
    out = tmp_path / "masks"
    z = np.load(SAMPLE)
    boxes = tmp_path / "boxes.csv"
    # every image's mask is the whole image: every map's top pixel and all its mass are inside
    boxes.write_text("name,x0,y0,x1,y1\n" + "".join(f"x[{i}],0,0,20,20\n" for i in range(len(z["y"]))))
    _audit([str(MODEL), "--data", str(SAMPLE), "--out", str(out), "--masks", str(boxes),
            "--methods", "vanilla", "--per-class", "1", "--eval-images", "6", "--sanity-images", "2",
            "--max-steps", "1", "--shortcut-images", "0",
            "--metric", "pointing-game,relevance-mass-accuracy,sparseness", "--quiet"])
    loc = _report(out)["localisation"]
    assert loc["given"] and loc["images"] == 6 and loc["mask_fraction"] == 1.0
    assert loc["metrics"]["pointing-game"]["methods"]["vanilla"]["value"] == 1.0
    assert loc["metrics"]["relevance-mass-accuracy"]["methods"]["vanilla"]["value"] == pytest.approx(1.0)


def test_untrusted_strings_are_escaped(tmp_path):
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"{evil}{i}" for i in range(10)]))
    z = dict(np.load(SAMPLE))
    data = tmp_path / f"{'<b>'}data.npz"
    np.savez(data, x=z["x"][::20], y=z["y"][::20])
    model = tmp_path / "m<i>odel&.onnx"
    shutil.copy(MODEL, model)
    out = tmp_path / "evil"
    _audit([str(model), "--data", str(data), "--out", str(out), "--labels", str(labels),
            "--methods", "vanilla", "--per-class", "1", "--eval-images", "4", "--sanity-images", "2",
            "--max-steps", "1", "--shortcut-images", "0", "--metric", "sparseness", "--quiet"])
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>data" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "m&lt;i&gt;odel&amp;.onnx" in html
    assert len(re.findall(r"<script\b", html)) == 1  # the report's own review script


def _review(out: Path, verdicts: dict, **extra) -> Path:
    r = _report(out)
    path = out.parent / "review_in.json"
    path.write_text(json.dumps({"format": "onnxsal-review", "version": 1, "audit": r["id"],
                                "reviewer": "Dr. <Who>", "verdicts": verdicts, **extra}))
    return path


def test_review_folds_back_agreement_per_method_and_class(audited, tmp_path):
    out = tmp_path / "rev"
    shutil.copytree(audited, out)
    items = _report(out)["samples"]["items"]
    a, b = items[0], items[1]
    verdicts = {f"{a['image']}:vanilla": "agree", f"{a['image']}:gradcam": "disagree",
                f"{b['image']}:vanilla": "agree"}
    res = CliRunner().invoke(cli, ["audit", "--review", str(_review(out, verdicts)), "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "3 of" in res.output and "66.7%" in res.output
    rv = _report(out)["review"]
    assert rv["per_method"]["vanilla"]["agreement"] == 1.0
    assert rv["per_method"]["gradcam"]["agreement"] == 0.0
    assert rv["overall"]["agreement"] == pytest.approx(2 / 3)
    assert rv["per_class"][str(a["class"])]["reviewed"] == (3 if a["class"] == b["class"] else 2)
    html = (out / "report.html").read_text()
    assert 'id="review-agreement">66.7%' in html and "Dr. &lt;Who&gt;" in html
    # the verdicts show as pressed buttons, and a re-run of the audit keeps the review
    assert html.count('aria-pressed="true"') == 3
    _audit([str(MODEL), "--data", str(SAMPLE), "--out", str(out), *SMALL])
    assert _report(out)["review"]["overall"]["reviewed"] == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "not an onnxsal review"),
    (lambda d: d.update(audit="abc"), "made on audit abc"),
    (lambda d: d.update(verdicts={"99999:vanilla": "agree"}), "is not a map of this report"),
    (lambda d: d.update(verdicts={"ITEM": "maybe"}), "is not 'agree' or 'disagree'"),
    (lambda d: d.update(verdicts=[1]), "must be an object"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (None, "not JSON"),
])
def test_bad_review_is_one_line(audited, tmp_path, capsys, monkeypatch, mutate, message):
    r = _report(audited)
    first = f"{r['samples']['items'][0]['image']}:vanilla"
    d = {"format": "onnxsal-review", "version": 1, "audit": r["id"], "verdicts": {first: "agree"}}
    if mutate is not None:
        mutate(d)
        if d["verdicts"] == {"ITEM": "maybe"}:
            d["verdicts"] = {first: "maybe"}
    path = tmp_path / "bad.json"
    path.write_text("{not json" if mutate is None else json.dumps(d))
    before = (audited / "report.html").read_bytes()
    monkeypatch.setattr("sys.argv", ["onnxsal", "audit", "--review", str(path), "--out", str(audited)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: review ") and message in err
    assert err.count("\n") == 1
    assert (audited / "report.html").read_bytes() == before


def test_review_needs_an_audit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["onnxsal", "audit", "--review", str(tmp_path / "r.json"),
                                     "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        main()
    assert "no audit here" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["onnxsal", "audit", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        main()
    assert "give MODEL and --data" in capsys.readouterr().err


def _corner_model(path: Path) -> None:
    """ONNX: class 1 iff the corner rows 1..3, columns 12..14 are bright; class 2 iff the image
    is bright; else class 0 (the shortcut finder's hand-built model, tests/test_shortcuts.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, v, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(v, dtype), name)

    inits = [const("st", [1, 12], np.int64), const("en", [4, 15], np.int64), const("ax", [2, 3], np.int64),
             const("a", 20.0), const("h1", 0.5), const("h2", 0.45), const("zero", np.zeros((1, 1)))]
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax"], ["corner"]),
             helper.make_node("ReduceMean", ["corner"], ["cm"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("ReduceMean", ["x"], ["om"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Sub", ["cm", "h1"], ["c1"]), helper.make_node("Mul", ["c1", "a"], ["l1"]),
             helper.make_node("Sub", ["om", "h2"], ["c2"]), helper.make_node("Mul", ["c2", "a"], ["l2"]),
             helper.make_node("Unsqueeze", ["l1"], ["u1"], axes=[1]),
             helper.make_node("Unsqueeze", ["l2"], ["u2"], axes=[1]),
             helper.make_node("Mul", ["u1", "zero"], ["u0"]),
             helper.make_node("Concat", ["u0", "u1", "u2"], ["logits"], axis=1)]
    g = helper.make_graph(nodes, "corner", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=8), path)


def test_a_planted_corner_is_reported_as_a_shortcut(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    x = rng.uniform(0, 0.4, (3 * n, 1, 16, 16)).astype(np.float32)
    x[n:2 * n, 0, 1:4, 12:15] = rng.uniform(0.8, 1, (n, 3, 3))
    x[2 * n:] += 0.3
    y = np.repeat([0, 1, 2], n)
    data = tmp_path / "corner.npz"
    np.savez(data, x=(x * 255).round().astype(np.uint8), y=y)
    model = tmp_path / "corner.onnx"
    _corner_model(model)
    out = tmp_path / "out"
    _audit([str(model), "--data", str(data), "--out", str(out), "--methods", "gradient_x_input",
            "--per-class", "1", "--eval-images", "6", "--sanity-images", "3", "--max-steps", "1",
            "--metric", "sparseness", "--quiet"])
    r = _report(out)
    flagged = [f for f in r["shortcuts"]["findings"] if f["suspected"]]
    assert [f["class"] for f in flagged] == [1]
    y0, x0, y1, x1 = box = flagged[0]["box"]  # the corner [1, 12, 4, 15], grown by the finder's margin
    assert y0 <= 1 and x0 <= 12 and y1 >= 4 and x1 >= 15 and (y1 - y0) * (x1 - x0) <= 36, box
    assert r["summary"]["verdicts"][1]["level"] == "bad"
    # a model without a learnable layer cannot be randomised: the report says so, the rest goes on
    assert "no learnable layer" in r["sanity"]["error"]
    assert any(v["topic"] == "sanity" and "not run" in v["text"] for v in r["summary"]["verdicts"])
    assert "class 1" in r["summary"]["findings"][0]
    assert f"rows {y0}-{y1 - 1}, columns {x0}-{x1 - 1}" in r["summary"]["findings"][0]
    html = (out / "report.html").read_text()
    assert 'id="shortcut-1"' in html and "Suspected shortcut: class 1" in html
    ex = flagged[0]["examples"]
    assert ex and all((out / e[k]).is_file() for e in ex for k in ("source_png", "before_png", "after_png"))
    # the finder's image numbers map back to the data set's, and the examples flipped to class 1
    idx = r["shortcuts"]["image_index"]
    assert all(y[idx[e["image"]]] == 1 and y[idx[e["target_image"]]] != 1 and e["after"] == 1 for e in ex)


def test_without_labels_groups_by_prediction(tmp_path):
    z = np.load(SAMPLE)
    data = tmp_path / "nolabels.npz"
    np.savez(data, x=z["x"][::4])
    out = tmp_path / "nl"
    _audit([str(MODEL), "--data", str(data), "--out", str(out), "--methods", "vanilla", "--per-class", "1",
            "--eval-images", "6", "--sanity-images", "2", "--max-steps", "1", "--metric", "sparseness",
            "--shortcut-images", "0", "--quiet"])
    r = _report(out)
    assert r["predictions"]["accuracy"] is None and not r["predictions"]["labels"]
    assert r["benchmark"]["metric"] == "allegiance" and r["benchmark"]["clean"]["score"] == 1.0
    assert all(it["correct"] is None and it["class"] == it["pred"] for it in r["samples"]["items"])
    assert sum(r["predictions"]["predicted_counts"]) == 50
    assert "accuracy is unknown" in r["summary"]["verdicts"][0]["text"]


def test_thumbnails_enlarge_small_reduce_large_and_keep_the_box():
    import io

    from PIL import Image

    from onnxsal.audit import figures

    def decode(b):
        return np.asarray(Image.open(io.BytesIO(b)))

    small = decode(figures.thumb(np.zeros((20, 20, 3), np.float32), [2, 4, 6, 8]))
    assert small.shape == (100, 100, 3)  # 5x: at least 96 px
    ys, xs = np.nonzero(small.any(axis=2))
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (10, 20, 30, 40)
    big = decode(figures.thumb(np.zeros((400, 200, 3), np.float32), [100, 50, 200, 100]))
    assert big.shape == (192, 96, 3)
    ys, xs = np.nonzero(big.any(axis=2))
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (48, 24, 96, 48)
    # an overlay keeps the image where the map is zero-ish and colours it where it is large
    img = np.full((1, 4, 4), 0.5, np.float32)
    m = np.zeros((4, 4), np.float32)
    m[0, 0] = 1
    rgb = figures.overlay_rgb(img, m, signed=True)
    assert rgb[0, 0, 0] > 2 * rgb[0, 0, 2] and rgb[0, 0, 0] > 2 * rgb[0, 0, 1]  # red: supports the class
    assert np.allclose(rgb[3, 3], rgb[3, 3, 0], atol=0.01) and abs(rgb[3, 3, 0] - 0.5) < 0.2  # grey shows through


def test_planted_tag_on_fashion_mnist_named_and_clean_model_not_flagged(tmp_path):
    """The bundled Fashion-MNIST CNNs (benchmarks/shortcut_demo.py): trained with a tag on 90% of
    Pullover's training images, and without; the sample's class-2 images carry the tag."""
    from onnxsal.shortcuts import box_iou

    z = np.load(DATA / "fmnist_tag_sample.npz")
    tag_box, tag_class = z["tag_box"].tolist(), int(z["tag_class"])
    found = {}
    for kind in ("tagged", "clean"):
        out = tmp_path / kind
        _audit([str(DATA / f"fmnist_{kind}_cnn.onnx"), "--data", str(DATA / "fmnist_tag_sample.npz"),
                "--out", str(out), "--methods", "vanilla", "--per-class", "1", "--eval-images", "4",
                "--sanity-images", "2", "--max-steps", "1", "--metric", "sparseness", "--quiet"])
        r = _report(out)
        found[kind] = [f for f in r["shortcuts"]["findings"] if f["suspected"]]
        if kind == "tagged":
            assert "class Pullover" in r["summary"]["findings"][0]
    assert [f["class"] for f in found["tagged"]] == [tag_class] and found["clean"] == []
    assert box_iou(found["tagged"][0]["box"], tag_box) >= 0.5


def test_audit_images_read_by_index_and_batch_like_the_eager_load():
    from onnxsal.audit.images import AuditImages
    from onnxsal.data import load_dataset

    eager = load_dataset(str(DATA / "fmnist_tag_sample.npz"), shape=(1, 28, 28), limit=120)
    imgs = AuditImages(str(DATA / "fmnist_tag_sample.npz"), (1, 28, 28), limit=120)
    assert imgs.streamed
    assert imgs.fingerprint() == eager.fingerprint() and imgs.names == eager.names
    idx = np.array([5, 6, 7, 90, 3, 4, 119, 0])  # runs, out of order
    assert np.array_equal(imgs.take(idx), eager.images[idx])
    assert np.array_equal(np.concatenate(list(imgs.batches(50))), eager.images)
    sub = imgs.subset(idx)
    assert np.array_equal(sub.labels, eager.labels[idx]) and sub.names == [eager.names[i] for i in idx]
    # a Dataset given as is (no limit) and one cut by a limit read the same images in memory
    for given, lim in ((eager, None), (load_dataset(str(DATA / "fmnist_tag_sample.npz"), shape=(1, 28, 28)), 120)):
        mem = AuditImages(given, (1, 28, 28), limit=lim)
        assert not mem.streamed and mem.fingerprint() == eager.fingerprint()
        assert np.array_equal(mem.take(idx), eager.images[idx])
        assert np.array_equal(np.concatenate(list(mem.batches(50))), eager.images)


@pytest.mark.parametrize("extra, message", [
    (["--masks", "/no/such/masks.csv"], "masks /no/such/masks.csv: no such file or folder"),
    (["--metric", "nope"], "unknown metric 'nope'"),
    (["-m", "nope"], "unknown method 'nope'"),
])
def test_bad_options_fail_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    out = tmp_path / "o"
    monkeypatch.setattr("sys.argv", ["onnxsal", "audit", str(MODEL), "--data", str(SAMPLE), "--out", str(out),
                                     "--quiet", *extra])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1
    assert not (out / "parts").exists()
