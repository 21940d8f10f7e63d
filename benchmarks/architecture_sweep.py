"""The gradient pass across architectures: all-class input gradients from onnxsal's engine
against torch autograd in float64, random weights (seeded), 10 classes, batch 2, for every
torchvision classification model or for one small model of every timm architecture family.
Models over --max-params are skipped (memory and time on 2 cores).

    python benchmarks/architecture_sweep.py                     # torchvision (~25 min, 2 cores)
    python benchmarks/architecture_sweep.py --source timm       # timm families (~40 min)
    python benchmarks/architecture_sweep.py resnext50_32x4d regnet_x_8gf --seed 3

A large difference on one (model, seed) that other seeds do not show is a float32 kink: a ReLU
whose input lies within float32 rounding of 0 takes the other branch in onnxruntime's float32
forward than in torch's float64 one (`--check-relu` counts such flips at nn.ReLU modules).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def relu_flips(model, x, onnx_path) -> int:
    """ReLU inputs whose sign differs between torch float64 and onnxruntime float32 (models
    whose ReLUs are nn.ReLU modules, matched to the ONNX Relu nodes in call order)."""
    import onnx
    import torch
    from onnx import helper

    from onnxsal.onnx_util import cpu_session

    acts = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: acts.append(i[0].detach().numpy()))
             for mod in model.modules() if isinstance(mod, torch.nn.ReLU)]
    with torch.no_grad():
        model(x.double())
    for h in hooks:
        h.remove()
    m = onnx.load(onnx_path)
    relus = [n.input[0] for n in m.graph.node if n.op_type == "Relu"]
    for t in relus:
        m.graph.output.append(helper.make_empty_tensor_value_info(t))
    outs = cpu_session(m).run(
        relus, {m.graph.input[0].name: x.numpy()})
    if len(outs) != len(acts) or any(a.shape != b.shape for a, b in zip(acts, outs)):
        return -1  # not matchable
    return int(sum(np.sum((a > 0) != (b > 0)) for a, b in zip(acts, outs)))


SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mobile", "b0", "t", "s",
              "18", "26", "34", "50")


def timm_families() -> list[str]:
    """One model name per timm module: the first whose name says it is small."""
    import timm

    names = []
    for mod in timm.list_modules():
        cands = timm.list_models(module=mod)
        if not cands:
            continue

        def rank(n):
            parts = n.replace("-", "_").split("_")
            hits = [i for i, w in enumerate(SIZE_WORDS) if w in parts or any(p.endswith(w) for p in parts)]
            return (min(hits) if hits else len(SIZE_WORDS), len(n), n)

        names.append(sorted(cands, key=rank)[0])
    return names


def build(name: str, source: str):
    """(torch module in eval mode, input size) with random weights and 10 classes."""
    import torch
    import torchvision

    if source == "timm":
        import timm

        m = timm.create_model(name, pretrained=False, num_classes=10).eval()
        head = m.get_classifier()
        for mod in head.modules() if isinstance(head, torch.nn.Module) else []:
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.ndim == 2 and not w.any():  # zero-initialised
                torch.nn.init.normal_(w, std=0.02)
        size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        return m, size
    kw = {"weights": None, "num_classes": 10}
    if name.startswith("inception") or name == "googlenet":
        kw.update(aux_logits=False, init_weights=True)
    m = torchvision.models.get_model(name, **kw).eval()
    if name.startswith("vit"):  # torchvision zero-initialises the head: all gradients 0
        torch.nn.init.normal_(m.heads.head.weight, std=0.02)
    big = ("vit", "swin", "maxvit", "alexnet", "vgg")
    return m, 224 if name.startswith(big) else (96 if "inception" in name else 64)


@contextlib.contextmanager
def _quiet():
    """Silence file descriptors 1 and 2 (torch's exporter dumps whole graphs when it fails)."""
    sys.stdout.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def _jacobian(model, x, classes: int = 10) -> np.ndarray:
    import torch

    x = x.clone().requires_grad_(True)
    y = model(x)
    return np.stack([torch.autograd.grad(y[:, k].sum(), x, retain_graph=True)[0].double().numpy()
                     for k in range(classes)])


def main() -> None:
    import tempfile

    import torch
    import torchvision

    from converters.torch_export import export
    from onnxsal.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--source", choices=["torchvision", "timm"], default="torchvision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-params", type=float, default=90e6)
    ap.add_argument("--check-relu", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if a.models:
        names = a.models
    elif a.source == "timm":
        names = timm_families()
    else:
        names = torchvision.models.list_models(module=torchvision.models)
    print(f"command: python benchmarks/architecture_sweep.py {' '.join(sys.argv[1:])}")
    print("| model | input | onnxsal vs torch float64 | torch float32 vs float64 | relu flips | s |\n"
          "|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.time()
            try:
                torch.manual_seed(a.seed)
                m, size = build(name, a.source)
                n_params = sum(p.numel() for p in m.parameters())
                if n_params > a.max_params:
                    print(f"| {name} | | skipped ({n_params / 1e6:.0f}M parameters) | | | |", flush=True)
                    continue
                md = copy.deepcopy(m).double()  # before any run (some modules cache tensors)
                x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
                path = str(Path(tmp) / f"{name}.onnx")
                try:
                    with _quiet():
                        export(m, x[:1], path, opset=17)
                except Exception as exc:  # the exporter's limit, not onnxsal's
                    msg = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
                    print(f"| {name} | | torch export failed: {type(exc).__name__}: {msg} | | | |", flush=True)
                    continue
                eng = Engine(path, device="cpu", threads=2, use_disk_cache=False)
                got = np.concatenate([g for _, g in eng.class_gradients(x.numpy())])
                ref32 = _jacobian(m, x)  # torch's own float32 error shows how kinked the model is
                ref = _jacobian(md, x.double())
                scale = np.abs(ref).max()
                err, err32 = (float(np.abs(g - ref).max() / scale) for g in (got, ref32))
                flips = relu_flips(md, x, path) if a.check_relu else ""
                print(f"| {name} | {size} | {err:.1e} | {err32:.1e} | {flips} | {time.time() - t0:.0f} |",
                      flush=True)
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
                print(f"| {name} | | failed: {type(exc).__name__}: {msg} | | | |", flush=True)


if __name__ == "__main__":
    main()
