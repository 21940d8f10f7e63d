"""converters.torch_gradients: the gradient graph traced by PyTorch against onnxsal's pass.

Two independent implementations of dS/dx (PyTorch's backward formulas exported to ONNX, and
onnxsal.autodiff.augment on the plain ONNX export) must agree on onnxruntime for every class,
on a small CNN and a small ViT, at batch 1 and 3; torch.autograd is the third opinion.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import identity_seed, run_augmented, torch_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn

CLASSES = 10
TOL = 1e-4  # max abs difference <= TOL * max |grad|


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)  # overlapping windows: scatter-add matters
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, CLASSES)

    def forward(self, x):
        x = self.pool(torch.relu(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


def small_vit():
    from torchvision.models import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                          hidden_dim=32, mlp_dim=64, num_classes=CLASSES)
    # torchvision zero-initialises the head: every gradient would be 0
    nn.init.normal_(m.heads.head.weight, std=0.5)
    nn.init.normal_(m.heads.head.bias, std=0.1)
    return m.eval()


MODELS = {"cnn": (SmallCNN, (3, 16, 16)), "vit": (small_vit, (3, 32, 32))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (module, shape, torch-path model (read back from its file), augment()ed model)."""
    from converters.torch_export import export
    from converters.torch_gradients import export_with_gradients
    from onnxsal.autodiff import augment
    from onnxsal.model import load_model

    torch.manual_seed(0)
    out = {}
    for name, (make, shape) in MODELS.items():
        module = make().eval()
        path = tmp_path_factory.mktemp("tg") / f"{name}_grad.onnx"
        export_with_gradients(module, shape, path=path)
        ours = load_model(str(path))  # onnxsal's strict loader accepts the file
        theirs = augment(export(module, shape, dynamo=False))
        out[name] = (module, shape, ours, theirs)
    return out


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(MODELS))
def test_contract(exported, name):
    from onnxsal.autodiff import augmented_roles

    _, shape, ours, theirs = exported[name]
    onnx.checker.check_model(ours, full_check=True)
    assert ours.ir_version <= 10
    roles, ref = augmented_roles(ours), augmented_roles(theirs)
    assert set(roles) == set(ref) == {"onnxsal.seed", "onnxsal.logits", "onnxsal.grad.input",
                                      "onnxsal.input", "onnxsal.rules"}
    assert roles["onnxsal.rules"] == "default"
    ins = {i.name: i for i in ours.graph.input}
    outs = {o.name: o for o in ours.graph.output}
    assert set(ins) == {roles["onnxsal.input"], roles["onnxsal.seed"]}
    assert _dims(ins[roles["onnxsal.input"]]) == ["N", *shape]
    assert _dims(ins[roles["onnxsal.seed"]]) == ["K", "N", CLASSES]
    assert _dims(outs[roles["onnxsal.logits"]]) == ["N", CLASSES]
    assert _dims(outs[roles["onnxsal.grad.input"]]) == ["K", "N", *shape]
    # the image input has the same name in both files
    assert roles["onnxsal.input"] == ref["onnxsal.input"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_same_gradients_as_autodiff(exported, name, batch):
    module, shape, ours, theirs = exported[name]
    x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
    seed = identity_seed(CLASSES, batch)
    l1, g1 = run_augmented(ours, x, seed)
    l2, g2 = run_augmented(theirs, x, seed)
    g1, g2 = g1["input"], g2["input"]
    assert g1.shape == g2.shape == (CLASSES, batch, *shape)
    scale = np.abs(g2).max()
    assert scale > 0
    assert np.abs(g1 - g2).max() <= TOL * scale
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    # torch.autograd on the module: the third opinion
    l0, g0 = torch_jacobian(module, x)
    assert np.abs(g1 - g0).max() <= TOL * np.abs(g0).max()
    np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_any_seed_count(exported, k):
    """K is dynamic: K random seed rows give the seed-contracted Jacobian."""
    _, shape, ours, _ = exported["cnn"]
    rng = np.random.default_rng(7)
    x = rng.random((3, *shape), dtype=np.float32)
    _, jac = run_augmented(ours, x, identity_seed(CLASSES, 3))
    seed = rng.standard_normal((k, 3, CLASSES)).astype(np.float32)
    _, g = run_augmented(ours, x, seed)
    want = np.einsum("knc,cn...->kn...", seed, jac["input"])
    assert g["input"].shape == (k, 3, *shape)
    assert np.abs(g["input"] - want).max() <= TOL * np.abs(want).max()


def test_forward_does_not_need_the_seed(exported):
    """The logits do not depend on the seed input: the forward model can be cut out."""
    import onnxruntime as ort

    _, shape, ours, theirs = exported["cnn"]
    fwd = onnx.utils.Extractor(ours).extract_model(["input"], ["logits"])
    assert [i.name for i in fwd.graph.input] == ["input"]
    x = np.random.default_rng(3).random((2, *shape), dtype=np.float32)
    sess = ort.InferenceSession(fwd.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    ref, _ = run_augmented(theirs, x, identity_seed(CLASSES, 2))
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)


def test_engine_loads_it(exported):
    """By default the engine rebuilds the gradient of a file that carries its own (so other
    rule sets work); with gradients='file' it checks the file's against its own pass and uses
    it. Both give the gradients of the engine's pass on the plain export."""
    from onnxsal.engine import Engine
    from onnxsal.errors import OptionError

    _, shape, ours, theirs = exported["cnn"]
    plain = Engine(theirs, use_disk_cache=False, threads=1)
    x = np.random.default_rng(4).random((2, *shape), dtype=np.float32)
    ref_logits, ref = plain.gradient(x)
    for mode in ("auto", "file"):
        eng = Engine(ours, use_disk_cache=False, threads=1, gradients=mode)
        assert eng.input_shape == shape and eng.num_classes == CLASSES
        assert ("rebuilt" in eng.gradient_source) == (mode == "auto")
        logits, g = eng.gradient(x)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, ref, atol=1e-5 * np.abs(ref).max())
    assert eng.gradient_source.startswith("file's own, verified against onnxsal's pass")
    with pytest.raises(OptionError, match="own gradient graph"):
        eng.gradient(x, rules="guided")
    rebuilt = Engine(ours, use_disk_cache=False, threads=1)
    np.testing.assert_allclose(rebuilt.gradient(x, rules="guided")[1],
                               plain.gradient(x, rules="guided")[1], atol=1e-6)


def test_refusals():
    from converters.torch_gradients import export_with_gradients
    from onnxsal.errors import OptionError

    with pytest.raises(OptionError, match="wrt_input"):
        export_with_gradients(SmallCNN(), (3, 16, 16), wrt_input=False)
    with pytest.raises(OptionError, match="opset"):
        export_with_gradients(SmallCNN(), (3, 16, 16), opset=17)
    with pytest.raises(OptionError, match="logits"):
        export_with_gradients(nn.Conv2d(3, 4, 3), (3, 8, 8))


def test_exporter_failure_is_one_error():
    """An operator the exporter cannot lower: a ModelError naming it, not pages of trace."""
    from converters.torch_gradients import export_with_gradients
    from onnxsal.errors import ModelError

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ModelError, match="adaptive_max_pool2d") as info:
        export_with_gradients(m.eval(), (3, 8, 8))
    assert "\n" not in str(info.value)
