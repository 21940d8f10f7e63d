"""Sanity checks (docs/definitions.md#sanity-checks): randomisation of ONNX weights and the driver."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.errors import OptionError
from onnxsal.metrics.randomisation import cascading_steps, independent_steps, pick_steps, randomize
from onnxsal.metrics.sanity import find_layers

RNG = np.random.default_rng(0)


def _init(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.normal(size=shape) * scale).astype(np.float32), name)


def _model(nodes, inits, out_dim, in_shape=("N", 2, 6, 6)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_bn_model():
    """x -> Conv(W1, B1) -> BN -> Relu -> Conv(Identity(W2)) -> Relu -> GAP -> Flatten
    -> MatMul(Transpose(Wfc)) -> Add(bfc) -> logits, as legacy and dynamo exports write it."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_mean", "bn_var"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["W2_store"], ["W2"], name="w2_identity"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Transpose", ["Wfc_store"], ["WfcT"], name="wfc_t", perm=[1, 0]),
        helper.make_node("MatMul", ["f", "WfcT"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "bfc"], ["logits"], name="fc_bias"),
    ]
    inits = [_init("W1", (8, 2, 3, 3)), _init("B1", (8,)),
             _init("bn_s", (8,)), _init("bn_b", (8,)), _init("bn_mean", (8,)),
             numpy_helper.from_array(RNG.uniform(0.5, 2, 8).astype(np.float32), "bn_var"),
             _init("W2_store", (8, 8, 3, 3)), _init("Wfc_store", (3, 8)), _init("bfc", (3,)),
             _init("unused_extra", (4,))]
    return _model(nodes, inits, 3)


def shared_weight_model():
    """The same stored 2x2x3x3 kernel read by two convolutions (tied weights), then Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "Wsh", "b1"], ["c1"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "Wsh"], ["c2"], name="convB", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["logits"], name="head", transB=1),
    ]
    inits = [_init("Wsh", (2, 2, 3, 3)), _init("b1", (2,)), _init("Wg", (4, 2)), _init("bg", (4,))]
    return _model(nodes, inits, 4)


def constant_node_model():
    w = numpy_helper.from_array(RNG.normal(size=(2, 5)).astype(np.float32), "wc")
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=w),
        helper.make_node("Flatten", ["x"], ["f0"]),
        helper.make_node("Gemm", ["f0", "Wp"], ["h"], name="proj"),
        helper.make_node("MatMul", ["h", "Wc"], ["logits"], name="head"),
    ]
    return _model(nodes, [_init("Wp", (8, 2))], 5, in_shape=("N", 2, 2, 2))


def _inits(m):
    return {t.name: t.SerializeToString() for t in m.graph.initializer}


def _arr(m, name):
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def _run(m, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


# -- layers -----------------------------------------------------------------------------------

def test_layers_found_top_first_with_their_tensors():
    layers = find_layers(conv_bn_model())
    assert [L.name for L in layers] == ["fc", "conv2", "bn1", "conv1"]
    by = {L.name: L for L in layers}
    assert by["fc"].tensors == ("Wfc_store", "bfc")  # through the Transpose; bias from the Add
    assert (by["fc"].fan_in, by["fc"].fan_out, by["fc"].init) == (8, 3, "glorot")
    assert by["conv2"].tensors == ("W2_store",)  # through the Identity; no bias
    assert (by["conv2"].fan_in, by["conv2"].init) == (72, "he")
    assert by["bn1"].tensors == ("bn_s", "bn_b")  # running mean/var are not parameters
    assert by["conv1"].tensors == ("W1", "B1")
    assert by["conv1"].init == "he"  # Conv -> BN -> Relu counts as followed by a ReLU
    assert by["conv1"].std == pytest.approx(np.sqrt(2 / 18))
    assert by["fc"].std == pytest.approx(np.sqrt(2 / 11))
    assert [L.distance for L in layers] == sorted(L.distance for L in layers)


def test_longest_path_orders_residual_branches():
    # conv_early feeds both the deep branch and a skip straight to the sum: by shortest path it
    # would look closer to the logits than conv_deep, which it feeds
    nodes = [
        helper.make_node("Conv", ["x", "We"], ["e"], name="conv_early"),
        helper.make_node("Relu", ["e"], ["re"]),
        helper.make_node("Conv", ["re", "Wd"], ["d"], name="conv_deep"),
        helper.make_node("Relu", ["d"], ["rd"]),
        helper.make_node("Conv", ["rd", "Wd2"], ["d2"], name="conv_deep2"),
        helper.make_node("Add", ["d2", "re"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    m = _model(nodes, [_init("We", (2, 2, 1, 1)), _init("Wd", (2, 2, 1, 1)), _init("Wd2", (2, 2, 1, 1))], 2)
    assert [L.name for L in find_layers(m)] == ["conv_deep2", "conv_deep", "conv_early"]


# -- randomisation changes exactly the intended tensors ----------------------------------------

@pytest.mark.parametrize("which", ["fc", "conv2", "bn1", "conv1"])
def test_randomise_one_layer_changes_exactly_its_tensors(which):
    m = conv_bn_model()
    before = m.SerializeToString()
    layer = next(L for L in find_layers(m) if L.name == which)
    r = randomize(m, [layer], seed=3)
    assert m.SerializeToString() == before  # the input is never modified
    a, b = _inits(m), _inits(r)
    assert list(a) == list(b)
    changed = {k for k in a if a[k] != b[k]}
    assert changed == set(layer.tensors)
    assert [n.SerializeToString() for n in m.graph.node] == [n.SerializeToString() for n in r.graph.node]
    for o in layer.biases:
        assert not _arr(r, o.source).any()
    for o in layer.weights:
        w = _arr(r, o.source)
        assert w.shape == _arr(m, o.source).shape and w.dtype == np.float32 and w.std() > 0
    # batch-norm running statistics are kept, whatever is randomised
    for k in ("bn_mean", "bn_var"):
        assert b[k] == a[k]
    onnx.checker.check_model(r)
    x = RNG.random((2, 2, 6, 6), dtype=np.float32)
    y0, y1 = _run(m, x), _run(r, x)
    assert np.isfinite(y1).all() and not np.allclose(y0, y1)


def test_weights_follow_the_fan_in_rule():
    m = conv_bn_model()
    layers = find_layers(m)
    r = randomize(m, layers, seed=0)
    w2 = _arr(r, "W2_store")  # 576 draws, He: std sqrt(2 / 72)
    assert w2.mean() == pytest.approx(0, abs=0.05)
    assert w2.std() == pytest.approx(np.sqrt(2 / 72), rel=0.1)
    w1 = _arr(r, "W1")  # 144 draws, He: std sqrt(2 / 18)
    assert w1.std() == pytest.approx(np.sqrt(2 / 18), rel=0.2)


def test_seeded_and_consistent_across_steps():
    m = conv_bn_model()
    layers = find_layers(m)
    a = randomize(m, layers[:2], seed=7)
    assert a.SerializeToString() == randomize(m, layers[:2], seed=7).SerializeToString()
    assert _inits(a) != _inits(randomize(m, layers[:2], seed=8))
    # a layer gets the same weights in every cascading step and in independent randomisation
    one = randomize(m, layers[:1], seed=7)
    assert _inits(one)["Wfc_store"] == _inits(a)["Wfc_store"]
    alone = randomize(m, [layers[1]], seed=7)
    assert _inits(alone)["W2_store"] == _inits(a)["W2_store"]
    # layers may be given by name
    assert randomize(m, ["fc", "conv2"], seed=7).SerializeToString() == a.SerializeToString()
    with pytest.raises(OptionError):
        randomize(m, ["nope"])


def test_shared_initializer_gets_a_private_copy():
    m = shared_weight_model()
    layers = {L.name: L for L in find_layers(m)}
    assert set(layers) == {"head", "convB", "convA"}
    b = layers["convB"]
    assert not b.weights[0].private
    r = randomize(m, [b], seed=1)
    a0, a1 = _inits(m), _inits(r)
    assert all(a1[k] == a0[k] for k in a0)  # the stored tied kernel is untouched
    new = [k for k in a1 if k not in a0]
    assert new == ["Wsh.onnxsal_random.convB"]
    conv_a = next(n for n in r.graph.node if n.name == "convA")
    conv_b = next(n for n in r.graph.node if n.name == "convB")
    assert conv_a.input[1] == "Wsh" and conv_b.input[1] == new[0]
    assert _arr(r, new[0]).shape == (2, 2, 3, 3)
    onnx.checker.check_model(r)
    x = RNG.random((2, 2, 6, 6), dtype=np.float32)
    assert not np.allclose(_run(m, x), _run(r, x))
    # randomising both readers gives two different private copies
    both = randomize(m, [layers["convA"], b], seed=1)
    extra = sorted(k for k in _inits(both) if k not in a0)
    assert extra == ["Wsh.onnxsal_random.convA", "Wsh.onnxsal_random.convB"]
    assert not np.array_equal(_arr(both, extra[0]), _arr(both, extra[1]))
    assert not _arr(both, "b1").any()  # convA's own bias was private: zeroed in place


def test_constant_node_weight_is_randomised_in_place():
    m = constant_node_model()
    layers = find_layers(m)
    assert [L.name for L in layers] == ["head", "proj"]
    head = layers[0]
    assert head.weights[0].source_kind == "constant" and head.fan_in == 2
    r = randomize(m, [head], seed=0)
    assert _inits(r) == _inits(m)
    c0 = numpy_helper.to_array(m.graph.node[0].attribute[0].t)
    c1 = numpy_helper.to_array(r.graph.node[0].attribute[0].t)
    assert c1.shape == c0.shape and not np.array_equal(c0, c1)
    assert [n.SerializeToString() for n in m.graph.node[1:]] == \
           [n.SerializeToString() for n in r.graph.node[1:]]


def test_torch_dynamo_export():
    torch = pytest.importorskip("torch")
    from conftest import export_torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3))
    # (legacy exports are covered by the digits model below)
    m = export_torch(net, torch.zeros(1, 1, 6, 6), dynamo=True)
    layers = find_layers(m)
    assert [(L.op_type in ("Gemm", "MatMul"), L.fan_in, L.init) for L in layers] == \
           [(True, 64, "glorot"), (False, 9, "he")]
    assert all(len(L.biases) == 1 for L in layers)
    r = randomize(m, layers, seed=0)
    changed = {k for k, v in _inits(m).items() if _inits(r)[k] != v}
    assert changed == {t for L in layers for t in L.tensors}


def test_steps():
    layers = find_layers(conv_bn_model())
    casc = cascading_steps(layers)
    assert [[L.name for L in s] for s in casc] == [["fc"], ["fc", "conv2"], ["fc", "conv2", "bn1"],
                                                   ["fc", "conv2", "bn1", "conv1"]]
    assert [[L.name for L in s] for s in independent_steps(layers)] == [["fc"], ["conv2"], ["bn1"], ["conv1"]]
    assert pick_steps(4, None) == [0, 1, 2, 3]
    assert pick_steps(100, 5) == [0, 25, 50, 74, 99]
    assert pick_steps(100, 1) == [99]


# -- the driver ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model():
    """A small CNN trained on scikit-learn's 8x8 digits (a few seconds on one core)."""
    torch = pytest.importorskip("torch")
    sk = pytest.importorskip("sklearn.datasets")
    from conftest import export_torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = sk.load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(10):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    acc = float((net(xt).argmax(1) == yt).float().mean())
    assert acc > 0.9
    return export_torch(net, xt[:2]), x[:24]


def vanilla_gradient(engine, images, targets=None, **options):
    """A model-dependent "method": dS_c/dx through the engine."""
    return engine.gradient(images, targets)[1]


def sobel_edges(engine, images, targets=None, **options):
    """A model-independent "method": an edge detector on the image."""
    from scipy import ndimage

    g = np.asarray(images).sum(axis=1)
    return np.hypot(ndimage.sobel(g, axis=1), ndimage.sobel(g, axis=2))


def _engine_counter(counter):
    from onnxsal.engine import Engine

    def factory(m):
        counter.append(1)
        return Engine(m, device="cpu", threads=1, use_disk_cache=False)

    return factory


def test_gradient_passes_and_edge_detector_fails(digits_model, tmp_path):
    model, x = digits_model
    built = []
    methods = {"gradient": vanilla_gradient, "edges": sobel_edges}
    from onnxsal.sanity_run import run_sanity

    rep = run_sanity(model, x, methods, tmp_path, seed=0, engine_factory=_engine_counter(built))
    assert len(rep["layers"]) == 4 and len(rep["steps"]) == 5
    assert len(built) == 6  # the trained model, step 0 (trained copy), 4 cascading steps
    v = rep["verdicts"]
    assert v["gradient"]["passes"] is True and v["gradient"]["final"] < 0.3
    assert v["edges"]["passes"] is False and v["edges"]["final"] == pytest.approx(1.0)
    for s in rep["steps"]:
        e = s["methods"]["edges"]
        assert e["spearman_abs"]["mean"] == pytest.approx(1.0) and e["ssim"]["mean"] == pytest.approx(1.0)
        assert e["spearman_abs"]["n"] == len(x)
    g = [s["methods"]["gradient"]["spearman_abs"]["mean"] for s in rep["steps"]]
    assert g[0] == pytest.approx(1.0) and g[-1] < g[1] < g[0]
    assert rep["steps"][0]["class_agreement"] == 1.0
    for f in ("sanity.json", "sanity.md", "cascading.png", "maps_grid.png"):
        assert (tmp_path / f).stat().st_size > 0
    md = (tmp_path / "sanity.md").read_text()
    assert "| gradient | **pass**" in md and "| edges | **fail**" in md and "passes when" in md
    assert json.loads((tmp_path / "sanity.json").read_text())["verdicts"] == json.loads(json.dumps(v))

    # resumable: a second run reuses every step file and writes the same results
    first = (tmp_path / "sanity.json").read_bytes()
    (tmp_path / "steps" / "step_003.npz").unlink()  # as if interrupted before step 3 finished
    again = []
    run_sanity(model, x, methods, tmp_path, seed=0, engine_factory=_engine_counter(again))
    assert len(again) == 2  # the trained model, and step 3 only
    assert (tmp_path / "sanity.json").read_bytes() == first
    # other settings do not reuse the step files
    other = []
    rep2 = run_sanity(model, x, methods, tmp_path, seed=1, engine_factory=_engine_counter(other),
                      plots=False)
    assert len(other) == 6 and rep2["seed"] == 1


def test_independent_mode(digits_model, tmp_path):
    from onnxsal.sanity_run import run_sanity

    model, x = digits_model
    rep = run_sanity(model, x[:8], {"gradient": vanilla_gradient, "edges": sobel_edges}, tmp_path,
                     mode="independent", max_steps=2, engine_factory=_engine_counter([]))
    assert [s["layers_randomised"] for s in rep["steps"]] == [0, 1, 1]
    assert [s["label"] for s in rep["steps"][1:]] == [rep["layers"][0]["name"], rep["layers"][-1]["name"]]
    assert rep["verdicts"]["edges"]["passes"] is False
    assert rep["verdicts"]["gradient"]["passes"] is True
    assert (tmp_path / "independent.png").is_file()


def test_cli_sanity(digits_model, tmp_path):
    from click.testing import CliRunner

    from onnxsal.cli import cli

    model, x = digits_model
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x[:6], y=np.arange(6))
    out = tmp_path / "out"
    args = ["sanity", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-m", "vanilla",
            "--limit", "4", "--max-steps", "2", "--out", str(out), "--device", "cpu", "--threads", "1"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "vanilla" in res.output and "pass" in res.output
    rep = json.loads((out / "sanity.json").read_text())
    assert rep["images"] == 4 and len(rep["steps"]) == 3 and rep["data"]["count"] == 4
    bad = CliRunner().invoke(cli, args[:-6] + ["--out", str(out), "--mode", "sideways"])
    assert bad.exit_code != 0


def test_compare_models(digits_model):
    from onnxsal.sanity_run import compare_models

    model, x = digits_model
    methods = {"gradient": vanilla_gradient, "edges": sobel_edges}
    same = compare_models(model, model, x[:8], methods, engine_factory=_engine_counter([]))
    assert same["class_agreement"] == 1.0
    assert same["methods"]["gradient"]["spearman_abs"]["mean"] == pytest.approx(1.0)
    other = randomize(model, find_layers(model), seed=0)
    diff = compare_models(model, other, x[:8], methods, engine_factory=_engine_counter([]))
    assert diff["methods"]["gradient"]["spearman_abs"]["mean"] < 0.5
    assert diff["methods"]["edges"]["spearman_abs"]["mean"] == pytest.approx(1.0)
    assert len(diff["per_image"]["gradient"]["ssim"]) == 8
