"""Train the paper's CNN and ResNet-18 on Fashion-MNIST (docs/definitions.md#paper-models) and export them to ONNX.

Recipe: AdamW lr 1e-3, weight decay 0.01, cross-entropy, batch 128, seed 42, pixels in [0, 1],
no normalisation or augmentation, last epoch evaluated. Differences from the paper, forced by a
2-core CPU and offline data (see models/README.md): Fashion-MNIST instead of CIFAR-10/Imagenette,
1-channel models at the native 28x28 (no upsampling), and fewer epochs than 50.

    nice -n 10 python benchmarks/paper/train_fashion.py --models cnn --cnn-epochs 8
    nice -n 10 python benchmarks/paper/train_fashion.py --models resnet18 --resnet-epochs 1
    python benchmarks/paper/train_fashion.py --export-only      # re-export saved weights

Weights are saved as state dicts under benchmarks/paper/models/ (not committed) and re-read
with ``torch.load(weights_only=True)``; ONNX files and train_log_<model>.json are committed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.models.paper_models import build  # noqa: E402
from benchmarks.models.training import load_fashion_mnist_nchw, load_state, save_state, train  # noqa: E402
from onnxsal.data import FASHION_MNIST_CLASSES  # noqa: E402

OUT = HERE / "models"
PREPROCESS = {"scale": 1.0, "mean": [0.0], "std": [1.0], "bgr": False, "layout": "NCHW"}


def export(name: str, x_test, y_test, log: dict) -> None:
    import numpy as np
    import torch

    from converters.torch_export import export as export_onnx
    from converters.torch_export import parity

    model = load_state(build(name, 10, 1), OUT / f"fashion_{name}.pt")
    path = OUT / f"fashion_{name}.onnx"
    export_onnx(model, (1, 28, 28), path, opset=17, dynamo=False, preprocess=PREPROCESS,
                labels=FASHION_MNIST_CLASSES)
    torch.set_num_threads(1)
    p = parity(model, path, x_test[:512])
    # accuracy of the ONNX file itself on the whole test set
    from onnxsal.onnx_util import cpu_session

    sess = cpu_session(path, threads=1)
    pred = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x_test[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(x_test), 500)])
    log.setdefault(name, {}).update({"onnx": path.name, "onnx_bytes": path.stat().st_size,
                                     "onnx_test_accuracy": float((pred == y_test).mean()),
                                     "parity_512": p})
    print(name, "exported", log[name], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cnn-epochs", type=int, default=15)
    ap.add_argument("--resnet-epochs", type=int, default=1)
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export-only", action="store_true")
    args = ap.parse_args()
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_fashion_mnist_nchw()
    for name in args.models.split(","):
        logf = OUT / f"train_log_{name}.json"  # one file per model: models may train in parallel
        log = json.loads(logf.read_text()) if logf.is_file() else {}
        if not args.export_only:
            epochs = args.cnn_epochs if name == "cnn" else args.resnet_epochs
            torch.manual_seed(42)
            model = build(name, 10, 1)
            # channels_last only speeds up CPU convolutions; weights are the same tensors
            model = model.to(memory_format=torch.channels_last)
            t0 = time.time()
            res = train(model, xtr, ytr, xte, yte, epochs=epochs, threads=args.threads,
                        log=lambda s, n=name: print(n, s, flush=True))
            model = model.to(memory_format=torch.contiguous_format)
            save_state(model, OUT / f"fashion_{name}.pt")
            log[name] = {"epochs": epochs, "train_seconds": round(res.seconds, 1),
                         "torch_test_accuracy": res.test_accuracy, "history": res.history,
                         "threads": args.threads, "torch": torch.__version__,
                         "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0 + res.seconds))}
            logf.write_text(json.dumps(log, indent=2))
        try:
            export(name, xte, yte, log)
        except ImportError as exc:  # exporter not there yet: weights are saved, run --export-only
            print(name, "not exported:", exc, flush=True)
        logf.write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
