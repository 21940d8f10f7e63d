"""The acceptance test of issue 16 (docs/evaluate.md#maps-made-elsewhere): ``onnxsal evaluate``
on maps computed by captum for a torch model exported to ONNX gives the same scores as on
onnxsal's own maps of the same method, within the maps' own difference.

A small three-channel ReLU CNN (so the channel reduction of --maps is exercised), exported
with torch.onnx.export; captum's Saliency (signed, and abs=True for `original`),
IntegratedGradients (riemann_middle, 50 steps, black baseline: onnxsal's defaults) and
InputXGradient on the same images and targets (the class the ONNX model predicts), saved
per channel ([N, 3, H, W]) to an .npz and scored with ``--maps``.

The bound. For each image let d = max |m_captum - m_onnxsal| over its pixels (after the
channel reduction), P = H * W, so that the L1 difference of the two maps is at most P d. The
metrics compared are Lipschitz in the map's L1 norm, so their scores can differ by at most:

* sparseness (Gini of |m|, = sum_ij |m_i - m_j| / (2 P sum |m|)): 2 P d / sum |m|;
* relevance mass accuracy (R = mass of m+ in the mask / mass of m+): 2 P d / sum m+;
* completeness (|sum m - dS| / |dS|, dS the same for both): P d / |dS|;

(the sums taken over onnxsal's map; the derivations are in docs/evaluate.md). The test asserts
each image's score difference is within its bound (plus 1e-9 for rounding), and so the mean's.

Two metrics depend on the map only through an order: the pointing game through the position
of the maximum, region perturbation (MoRF) through the order of its 4 x 4 patch sums. When
onnxsal's map separates the maximum from the next value by more than 2 d (the patch sums
from each other by more than 2 * 16 d), captum's map has the same order, the model sees the
same perturbed images, and the score difference must be exactly 0; images closer to a tie
than that have no bound (they are counted, and must be a minority).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from captum import attr as captum_attr

from onnxsal.data import load_dataset
from onnxsal.engine import Engine
from onnxsal.methods.base import target_scores
from onnxsal.metrics.faithfulness import tile_sums

from conftest import export_torch
from test_hostile import run_main

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # captum's requires_grad notes

N, HW = 24, 16
PAIRS = {"vanilla": "saliency", "original": "saliency_abs",
         "integrated_gradients": "integrated_gradients", "gradient_x_input": "input_x_gradient"}
METRICS = "sparseness,relevance-mass-accuracy,completeness,pointing-game,region-perturbation-morf"
PATCH = 4  # region perturbation's default patch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 32), torch.nn.ReLU(),
            torch.nn.Linear(32, 5))

    def forward(self, x):
        return self.f(x)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("captum_eval")
    torch.manual_seed(0)
    net = Net().eval()
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (N, 3, HW, HW), dtype=np.uint8)
    np.savez(root / "data.npz", x=x8, y=rng.integers(0, 5, N))
    onnx.save(export_torch(net, torch.zeros(1, 3, HW, HW)), str(root / "net.onnx"))
    engine = Engine(str(root / "net.onnx"), device="cpu", threads=1, use_disk_cache=False)
    x = load_dataset(str(root / "data.npz"), shape=engine.input_shape).images  # what evaluate scores
    targets = engine.logits(x).argmax(axis=1)
    xt, tt = torch.from_numpy(x), torch.from_numpy(targets)
    cap = {
        "saliency": captum_attr.Saliency(net).attribute(xt, target=tt, abs=False),
        "saliency_abs": captum_attr.Saliency(net).attribute(xt, target=tt, abs=True),
        "integrated_gradients": captum_attr.IntegratedGradients(net).attribute(
            xt, baselines=torch.zeros_like(xt), target=tt, n_steps=50, method="riemann_middle"),
        "input_x_gradient": captum_attr.InputXGradient(net).attribute(xt, target=tt),
    }
    np.savez(root / "captum.npz", **{m: cap[c].detach().numpy() for m, c in PAIRS.items()})
    masks = np.zeros((N, HW, HW), bool)
    for i in range(N):
        a, b = rng.integers(0, HW - 6, 2)
        masks[i, a:a + 6, b:b + 6] = True
    np.savez(root / "masks.npz", masks=masks)
    common = ["evaluate", root / "net.onnx", "--data", root / "data.npz", "--metrics", METRICS,
              "--masks", root / "masks.npz", "--device", "cpu", "--threads", 1, "--quiet",
              "--bootstrap", 100, "--shard-size", 8]
    runs = {}
    for name, extra in (("onnxsal", ["-m", ",".join(PAIRS)]),
                        ("captum", ["--maps", root / "captum.npz"])):
        code, _, err = run_main([*common, "--out", root / name, *extra])
        assert code == 0, err
        runs[name] = json.loads((root / name / "scores.json").read_text())
    return root, engine, x, targets, masks, runs


def onnxsal_maps(root) -> dict[str, np.ndarray]:
    got: dict[str, list] = {}
    for f in sorted(root.glob("onnxsal/shards/*/maps/*.npz")):
        got.setdefault(f.name.split("-onnxsal-")[0], []).append(np.load(f)["maps"])
    return {k: np.concatenate(v) for k, v in got.items()}  # file names sort by start


def scores(run: dict, col: str, meth: str) -> np.ndarray:
    return np.array([np.nan if p["score"] is None else p["score"]
                     for p in run["scores"][col]["methods"][meth]["per_image"]])


def test_captum_maps_score_as_onnxsals_within_the_maps_difference(setup):
    root, engine, x, targets, masks, runs = setup
    own = onnxsal_maps(root)
    with np.load(root / "captum.npz") as z:
        raw = {k: z[k] for k in z.files}
    red = runs["captum"]["settings"]["maps"]["channel_reduction"]
    assert red == {"vanilla": "sum", "original": "max-abs", "integrated_gradients": "sum",
                   "gradient_x_input": "sum"}
    z = engine.logits(x)
    zb = engine.logits(np.zeros_like(x))
    d_s = target_scores(z, targets) - target_scores(zb, targets)
    P = HW * HW
    report = []
    for meth in PAIRS:
        a = own[meth].astype(np.float64)
        b = raw[meth].sum(axis=1) if red[meth] == "sum" else np.abs(raw[meth]).max(axis=1)
        d = np.abs(a - b).reshape(N, -1).max(axis=1)
        scale = np.abs(a).reshape(N, -1).max(axis=1)
        assert (d <= 1e-4 * scale).all(), (meth, (d / scale).max())  # captum agrees with onnxsal
        bounds = {
            "sparseness": 2 * P * d / np.abs(a).reshape(N, -1).sum(axis=1),
            "relevance-mass-accuracy": 2 * P * d / np.clip(a, 0, None).reshape(N, -1).sum(axis=1),
            "completeness": P * d / np.abs(d_s),
        }
        for col, bound in bounds.items():
            sa, sb = scores(runs["onnxsal"], col, meth), scores(runs["captum"], col, meth)
            both = np.isfinite(sa) & np.isfinite(sb)
            assert (np.isfinite(sa) == np.isfinite(sb)).all(), (col, meth)
            diff = np.abs(sa - sb)[both]
            assert (diff <= bound[both] + 1e-9).all(), (col, meth, diff.max(), bound[both].min())
            ma = runs["onnxsal"]["scores"][col]["methods"][meth]["mean"]
            mb = runs["captum"]["scores"][col]["methods"][meth]["mean"]
            if both.any():
                assert abs(ma - mb) <= bound[both].mean() + 1e-9
            report.append((meth, col, float(d.max() / scale.max()), float(diff.max(initial=0)),
                           f"bound {float(bound[both].max(initial=0)):.1e}"))
        flat = np.sort(a.reshape(N, -1), axis=1)
        sums = np.sort(tile_sums(a, PATCH), axis=1)
        same_order = {"pointing-game": flat[:, -1] - flat[:, -2] > 2 * d,
                      "region-perturbation-morf": np.diff(sums, axis=1).min(axis=1)
                      > 2 * PATCH * PATCH * d}
        for col, same in same_order.items():
            assert same.mean() >= 0.75, (col, meth, same.mean())  # the check is not vacuous
            sa, sb = scores(runs["onnxsal"], col, meth), scores(runs["captum"], col, meth)
            np.testing.assert_array_equal(sa[same], sb[same], err_msg=f"{col} {meth}")
            report.append((meth, col, float(d.max() / scale.max()),
                           float(np.abs(sa - sb)[same].max()),
                           f"same order on {same.sum()}/{N} images"))
    for r in report:  # shown with pytest -s: the measured figures
        print("%-22s %-24s max rel map diff %.1e  max score diff %.1e  %s" % r)
