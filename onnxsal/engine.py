"""The onnxruntime engine: one object per model, owning its sessions.

Every method and metric runs the model through an :class:`Engine`; nothing else builds an
onnxruntime session. The engine

* prepends the model's preprocessing, so its input space is float32 [0, 1] NCHW;
* picks providers (``auto`` uses CUDA only when a session really loads on it; :mod:`onnxsal.runtime`)
  and reports them;
* batches under a memory budget (on the CPU also under a cache-sized cap, docs/engine.md), and
  computes per-class Jacobians in chunks of seed rows;
* with ``threads`` > 1 on the CPU, runs the parts of a batch concurrently, one thread each
  (data parallel: the images, or else the seed rows, are split), which scales better than
  onnxruntime's intra-op threads on the gradient graph (its ConvTranspose, ScatterElements
  and DepthToSpace kernels hardly use a second thread);
* simplifies the graph with onnxruntime's basic optimizations before the gradient pass
  (:mod:`onnxsal.simplify`);
* does not trust a file's own gradient graph: it is rebuilt from the forward part, or used
  only after a check (:mod:`onnxsal.trust`);
* caches augmented (gradient) models on disk, keyed by the model's content hash, options and
  onnxsal's code fingerprint, each entry checked against its content hash when read
  (:mod:`onnxsal.cache`), in ``$ONNXSAL_CACHE`` or the user cache folder (``~/.cache/onnxsal``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import onnx

from . import cache, trust
from .autodiff import META_GRAD, META_LOGITS, META_RULES, META_SEED, META_VALUE, augment
from .autodiff.rules.registry import packaged
from .errors import InputError, ModelError, OptionError, first_line
from .model import (
    content_hash,
    dim_of,
    find_image_input,
    find_logits,
    load_model,
)
from .numeric import softmax
from .onnx_util import quiet_options
from .preprocess import PreprocessSpec, labels_from_model, parse, prepend, raw_shape
from .preprocess import from_model as preprocess_from_model
from .runtime import activation_bytes, capped_batch, pick_providers
from .runtime import cpu_batch_bytes as cpu_batch_bytes_of
from .simplify import simplify
from .tensors import check_external_data, densify

# live cotangent tensors of the largest activation's size per seed row and image: ~4 at the
# first run, but onnxruntime's arena grows to ~6 over many runs (ResNet-18, 224 px, measured)
COT_TENSORS_PER_SEED = 6


@dataclass
class VJP:
    """Result of one augmented run: logits [N, C], gradients {tensor: [K, N, ...]}, and the
    forward values {tensor: [N, ...]} of intermediate tensors that were differentiated."""

    logits: np.ndarray
    grads: dict[str, np.ndarray]
    values: dict[str, np.ndarray]


# onnxruntime's names of the float types numpy can feed
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class Engine:
    """An ONNX image classifier on onnxruntime, with gradients (see the module docstring).

    ``gradients`` (auto, rebuild, file) says what to do with a file that carries its own
    gradient graph (:mod:`onnxsal.trust`); ``gradient_source`` says whose gradients are used."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, *,
                 preprocess: str | PreprocessSpec | None = None, device: str = "auto",
                 output: str | None = None, memory_budget_mb: int = 2048,
                 cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                 use_disk_cache: bool = True, simplify: bool = True, gradients: str = "auto",
                 cpu_batch_bytes: int | None = None, input_shift: float = 0.0):
        if isinstance(model, onnx.ModelProto):
            self.path = None
            source = model
            check_external_data(source, None)  # no folder to read them from, never the CWD
        else:
            self.path = str(model)
            source = load_model(model)
        self.source_model = source
        # a file that carries its own gradient graph (onnxsal augment, converters.torch_gradients):
        # onnxsal works on its forward part and uses the file's gradient only after a check
        # (onnxsal.trust, `gradients`: auto, rebuild or file)
        self.gradients = trust.check_mode(gradients)
        self.carries_gradient = trust.carries_gradient(source)
        forward = trust.without_own_gradient(source, output)
        if self.gradients == "file" and not self.carries_gradient:
            raise OptionError("gradients 'file': this model carries no gradient graph of its own")
        spec = parse(preprocess) if isinstance(preprocess, str) else preprocess
        if spec is None:
            spec = preprocess_from_model(forward)
        self.preprocess = spec or PreprocessSpec()
        # input_shift c: the engine takes x + c for the model's x (values in [c, 1 + c]); its
        # preprocessing subtracts c first, so the model sees what it sees for x (the
        # shift-compensated model of the input-invariance test)
        self.input_shift = float(input_shift)
        if not np.isfinite(self.input_shift):
            raise OptionError(f"input_shift must be finite, got {input_shift}")
        self.input_range = (self.input_shift, 1.0 + self.input_shift)
        self.preprocess = self.preprocess.shifted(self.input_shift)
        self.input_spec = find_image_input(forward)
        self.logits_spec = find_logits(forward, output)
        self.labels = labels_from_model(forward)
        self.input_shape = raw_shape(self.input_spec, self.preprocess)
        forward = densify(forward, int(memory_budget_mb) << 20)  # the pass reads dense tensors
        self.model = prepend(forward, self.preprocess, self.input_spec)
        # the file's gradient takes the file's input as is: only when nothing is prepended
        self._input_as_is = self.model is forward
        inp = find_image_input(self.model)
        self.input_name = inp.name
        # a model exported with a fixed batch size runs in chunks of exactly that size
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.model_hash = content_hash(source)
        self._key = hashlib.sha256((self.model_hash + self.preprocess.to_json() + (output or "")).encode()).hexdigest()
        self.providers = pick_providers(device)
        self.output = output  # the output asked for (None: found), for engines of re-weighted copies
        self.provider = self.providers[0]
        self.threads = threads
        # data-parallel runs: `threads` one-thread runs on parts of each batch (CPU only)
        self.parallel = int(threads) if threads and int(threads) > 1 and \
            self.provider == "CPUExecutionProvider" else 1
        self._pool = None
        self._wide: dict[int, tuple] = {}  # id(session) -> (model, all-threads session or None)
        self.memory_budget = int(memory_budget_mb) << 20
        # CPU only: at most this many activation bytes per run (onnxsal.runtime.CPU_BATCH_BYTES)
        self.cpu_batch_bytes = cpu_batch_bytes_of(cpu_batch_bytes)
        self._cache_dir = cache_dir
        self._use_disk_cache = use_disk_cache
        self.simplify = simplify
        self._bytes_per_image, self._largest_tensor = activation_bytes(
            self.model, self.input_name, self.input_shape, self.memory_budget)
        self._sessions: dict = {}
        self._file = None  # (session, roles) of the file's own gradient graph, once verified
        self._layouts = None  # methods.cam.Layouts of self.model, read once
        self._cam_layer: str | None = None
        self._forward = self._make_forward()
        # the declared class count is only a claim (a file may lie): one run says what it is
        nc = int(self.logits(np.zeros((1,) + self.input_shape, np.float32)).shape[-1])
        if nc < 1:
            raise ModelError(f"the model's output '{self.logits_spec.tensor}' holds no values per "
                             "image: not a classifier's logits")
        self.num_classes = nc
        if self.labels is not None and len(self.labels) != self.num_classes:
            self.labels = None
        # which gradients this engine gives: recorded in inspect's and the results' files
        self.gradient_source = self._choose_gradients() if self.carries_gradient else trust.OWN_PASS

    # -- sessions ------------------------------------------------------------------------
    def _session(self, model: onnx.ModelProto, wide: bool = False):
        """A session; with data-parallel runs a one-thread one (the model is kept so that a
        session with all threads can be built for runs that do not split: see _wide_session)."""
        import onnxruntime as ort

        so = quiet_options(1 if (self.threads and self.parallel > 1 and not wide) else self.threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=self.providers)
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        if self.parallel > 1 and not wide:
            self._wide[id(sess)] = (model, None)
        return sess

    def _wide_session(self, sess):
        """The all-threads twin of a one-thread session (built on first use)."""
        model, wide = self._wide.get(id(sess), (None, None))
        if model is None:
            return sess
        if wide is None:
            wide = self._session(model, wide=True)
            self._wide[id(sess)] = (model, wide)
        return wide

    def _run_split(self, sess, names: list[str], feeds: dict, feed_axes: dict,
                   out_axes: list) -> list:
        """Run one batch, as `self.parallel` concurrent one-thread runs when it splits.

        ``feed_axes[name]`` / ``out_axes[j]``: (image axis, seed axis or None) of each feed and
        output. The images are split when there are enough of them, else the seed rows
        (outputs without a seed axis are then taken from the first part)."""
        P = self.parallel
        if P <= 1:
            return self._run(sess, names, feeds)
        img = next(iter(feed_axes))
        n = feeds[img].shape[feed_axes[img][0]]
        seed = next((f for f, (_, k) in feed_axes.items() if k is not None), None)
        k = feeds[seed].shape[feed_axes[seed][1]] if seed else 0
        if n >= P and self.fixed_batch is None:
            axis_of = {f: a[0] for f, a in feed_axes.items()}
            out_axis = [a[0] for a in out_axes]
            size = n
        elif k >= P:
            axis_of = {f: a[1] for f, a in feed_axes.items()}
            out_axis = [a[1] for a in out_axes]
            size = k
        else:
            return self._run(self._wide_session(sess), names, feeds)
        bounds = np.linspace(0, size, P + 1).round().astype(int)

        def part(i):
            a, b = bounds[i], bounds[i + 1]
            f = {name: (v if axis_of.get(name) is None else
                        np.ascontiguousarray(np.take(v, np.arange(a, b), axis=axis_of[name])))
                 for name, v in feeds.items()}
            return self._run(sess, names, f)

        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(P, thread_name_prefix="onnxsal-run")
        parts = list(self._pool.map(part, range(P)))
        return [parts[0][j] if ax is None else np.concatenate([r[j] for r in parts], axis=ax)
                for j, ax in enumerate(out_axis)]

    def _make_forward(self):
        m = self.model
        tensor = self.logits_spec.tensor
        if tensor not in {o.name for o in m.graph.output}:
            m = onnx.ModelProto.FromString(m.SerializeToString())
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
        return self._session(m)

    def _choose_gradients(self) -> str:
        """For a file with its own gradient graph: rebuild it with onnxsal's pass (rebuild; auto
        when the pass can differentiate the forward part), else verify the file's and use it."""
        if self.gradients == "rebuild":
            return trust.REBUILT
        if self.gradients == "file":
            return self._verify_file_gradient(try_pass=True)
        try:
            self.augmented()
            return trust.REBUILT
        except ModelError as exc:  # e.g. no rule for an operator: the file's gradient, checked
            why = str(exc)
        try:
            return self._verify_file_gradient(try_pass=False)
        except ModelError as exc:
            raise ModelError(f"onnxsal's pass cannot differentiate the forward part ({why}), and "
                             f"the file's own gradient cannot be used: {exc}") from None

    def _verify_file_gradient(self, try_pass: bool) -> str:
        """Check the file's gradient on a probe (trust.verify) against onnxsal's pass when it
        can run, else finite differences; on success the engine uses it."""
        if not self._input_as_is:
            raise OptionError(f"this model's own gradient graph is taken with respect to its input "
                              f"'{self.input_spec.name}' as it is; it cannot take a preprocessing "
                              f"prefix or a layout or type conversion (use --gradients rebuild)")
        roles = trust.file_roles(self.source_model, self.input_name, self.logits_spec.tensor)
        x, seeds, rng = trust.probe(self.model_hash, self.fixed_batch or 2, self.input_shape,
                                    self.num_classes, self.predict)
        reference = None
        if try_pass:
            try:
                reference = self.vjp(x, seeds, rules=roles[META_RULES]).grads[self.input_name]
            except ModelError:
                pass  # the pass cannot differentiate the forward part: finite differences
        sess = self._session(self.source_model)
        grad = roles[META_GRAD + self.input_name]
        grads = self._run(sess, [grad], {self.input_name: x, roles[META_SEED]: seeds})[0]
        used = trust.verify(np.asarray(grads), seeds.shape[:2] + x.shape[1:], roles, reference,
                            lambda: trust.fd_errors(grads, x, seeds, self.logits, rng))
        self._file = (sess, roles)
        return used

    def augmented(self, rules: str = "default", wrt: Sequence[str] | None = None,
                  epsilon: float | None = None):
        """(session, metadata) of the gradient model for these options (memory and disk cached)."""
        opts = {"epsilon": epsilon} if epsilon is not None else {}
        if self._file is not None:
            built = self._file[1][META_RULES]
            if rules != built or wrt or epsilon is not None:
                raise OptionError(f"this engine uses the model's own gradient graph (rules '{built}', "
                                  f"with respect to the input); it cannot give rules '{rules}'"
                                  f"{' or gradients of ' + ', '.join(wrt) if wrt else ''}: give "
                                  f"onnxsal the plain model, or use --gradients rebuild")
            return self._file
        key = cache.entry_key(self._key, rules, list(wrt or []), opts, self.simplify)
        if key in self._sessions:
            return self._sessions[key]
        folder = cache.cache_dir(self._cache_dir)
        # the code fingerprint in the key covers onnxsal's rules only, not a plugin's
        disk = self._use_disk_cache and packaged(rules)
        aug = cache.load(folder, key) if disk else None
        if aug is None:
            keep = [self.logits_spec.tensor] + list(wrt or [])
            base = simplify(self.model, keep=keep) if self.simplify else self.model
            aug = augment(base, wrt=list(wrt) if wrt else None, rules=rules,
                          logits=self.logits_spec.tensor, options=opts)
            if disk:
                cache.store(folder, key, aug)
        meta = {p.key: p.value for p in aug.metadata_props}
        entry = (self._session(aug), meta)
        self._sessions[key] = entry
        return entry

    # -- batching ------------------------------------------------------------------------
    def _check_images(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(f"images have shape {tuple(x.shape)}; the model takes [N, "
                             f"{', '.join(map(str, self.input_shape))}] pixels in [0, 1]")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _bytes_per_run_image(self, seeds: int) -> int:
        """Estimated peak bytes per image of a run with `seeds` seed rows: the saved forward
        activations plus a few live cotangents of the largest tensor per seed row."""
        return self._bytes_per_image + seeds * COT_TENSORS_PER_SEED * self._largest_tensor

    def batch_size(self, seeds: int = 0) -> int:
        """Images per run that fit the memory budget (the model's own batch size when fixed);
        on the CPU provider also at most ``cpu_batch_bytes`` of activations in all, but one image
        per data-parallel part at least (docs/engine.md)."""
        if self.fixed_batch is not None:
            return self.fixed_batch
        per = self._bytes_per_run_image(seeds)
        n = max(1, int(self.memory_budget // per))
        if self.provider != "CPUExecutionProvider":
            return n
        return capped_batch(n, per, self.cpu_batch_bytes, self.parallel)

    def _pad(self, a: np.ndarray, axis: int = 0) -> np.ndarray:
        """Zero-pad a chunk along its image axis to the model's fixed batch size."""
        if self.fixed_batch is None or a.shape[axis] == self.fixed_batch:
            return a
        width = [(0, 0)] * a.ndim
        width[axis] = (0, self.fixed_batch - a.shape[axis])
        return np.pad(a, width)

    @staticmethod
    def _run(sess, names: list[str], feeds: dict) -> list:
        """Run a session; onnxruntime's failures become one-line ModelErrors.

        Feeds go in the dtype the session declares (a float16 or float64 model's image and
        seeds) and float outputs come back as float32, so that the rest of onnxsal computes in
        one precision whatever the model's."""
        declared = {i.name: _ORT_FLOATS.get(i.type) for i in sess.get_inputs()}
        feeds = {k: v.astype(declared[k]) if declared.get(k) and v.dtype != declared[k] else v
                 for k, v in feeds.items()}
        try:
            return [o.astype(np.float32) if isinstance(o, np.ndarray) and o.dtype.kind == "f"
                    and o.dtype != np.float32 else o for o in sess.run(names, feeds)]
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            msg = " ".join(str(exc).split())
            msg = msg.replace("[ONNXRuntimeError] : ", "")
            raise ModelError(f"onnxruntime failed to run the model: "
                             f"{msg[:300] or type(exc).__name__}") from None

    # -- forward -------------------------------------------------------------------------
    def logits(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        x = self._check_images(x)
        bs = batch_size or self.batch_size()
        out = []
        if self.fixed_batch is not None:
            bs = self.fixed_batch
        for i in range(0, len(x), bs):
            xb = x[i:i + bs]
            res = self._run_split(self._forward, [self.logits_spec.tensor], {self.input_name: self._pad(xb)},
                                  {self.input_name: (0, None)}, [(0, None)])[0]
            out.append(res[:len(xb)])
        if not out:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(out).reshape(len(x), -1)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)

    # -- gradients -----------------------------------------------------------------------
    def vjp(self, x: np.ndarray, seeds: np.ndarray, wrt: Sequence[str] | None = None,
            rules: str = "default", epsilon: float | None = None) -> VJP:
        """Contract each seed row [N, C] with the Jacobian of the logits: grads [K, N, ...]."""
        x = self._check_images(x)
        seeds = np.asarray(seeds, np.float32)
        if seeds.ndim != 3 or seeds.shape[1] != len(x) or seeds.shape[2] != self.num_classes:
            raise OptionError(f"seeds have shape {seeds.shape}; expected [K, {len(x)}, {self.num_classes}]")
        sess, meta = self.augmented(rules, wrt, epsilon)
        grad_keys = [k[len(META_GRAD):] for k in meta if k.startswith(META_GRAD)]
        value_keys = [k[len(META_VALUE):] for k in meta if k.startswith(META_VALUE)]
        names = [meta[META_LOGITS]] + [meta[META_GRAD + k] for k in grad_keys] + \
                [meta[META_VALUE + k] for k in value_keys]
        bs = self.batch_size(len(seeds))
        parts = []
        for i in range(0, len(x), bs):
            xb = x[i:i + bs]
            n = len(xb)
            res = self._run_split(sess, names, {
                self.input_name: self._pad(xb),
                meta[META_SEED]: np.ascontiguousarray(self._pad(seeds[:, i:i + bs], axis=1))},
                {self.input_name: (0, None), meta[META_SEED]: (1, 0)},
                [(0, None)] + [(1, 0)] * len(grad_keys) + [(0, None)] * len(value_keys))
            parts.append([res[0][:n]] + [r[:, :n] for r in res[1:1 + len(grad_keys)]]
                         + [r[:n] for r in res[1 + len(grad_keys):]])
        logits = np.concatenate([p[0] for p in parts]).reshape(len(x), -1)
        grads = {k: np.concatenate([p[1 + j] for p in parts], axis=1) for j, k in enumerate(grad_keys)}
        values = {k: np.concatenate([p[1 + len(grad_keys) + j] for p in parts])
                  for j, k in enumerate(value_keys)}
        return VJP(logits, grads, values)

    def targets_or_predicted(self, x: np.ndarray, targets=None) -> np.ndarray:
        if targets is None:
            return self.predict(x)
        t = np.broadcast_to(np.asarray(targets, np.int64), (len(x),)).copy()
        if (t < 0).any() or (t >= self.num_classes).any():
            raise OptionError(f"target class out of range 0..{self.num_classes - 1}: {sorted(set(t.tolist()))[:5]}")
        return t

    def gradient(self, x: np.ndarray, targets=None, rules: str = "default",
                 epsilon: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, C], dS_target/dx [N, C, H, W]); targets default to the predicted class."""
        x = self._check_images(x)
        t = self.targets_or_predicted(x, targets)
        seeds = np.zeros((1, len(x), self.num_classes), np.float32)
        seeds[0, np.arange(len(x)), t] = 1.0
        r = self.vjp(x, seeds, rules=rules, epsilon=epsilon)
        return r.logits, r.grads[self.input_name][0]

    def class_gradients(self, x: np.ndarray, classes: Sequence[int] | None = None,
                        chunk: int | None = None, rules: str = "default"
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (class indices [k], gradients [k, N, C, H, W]) over all (or the given) classes,
        k seed rows per run so that memory stays within the budget."""
        x = self._check_images(x)
        classes = np.arange(self.num_classes) if classes is None else np.asarray(classes, np.int64)
        if chunk is None:
            n = max(len(x), 1)
            spare = self.memory_budget / n - self._bytes_per_image
            chunk = int(spare // (COT_TENSORS_PER_SEED * self._largest_tensor)) if spare > 0 else 1
            chunk = max(1, min(chunk, len(classes)))
        for i in range(0, len(classes), chunk):
            cls = classes[i:i + chunk]
            seeds = np.zeros((len(cls), len(x), self.num_classes), np.float32)
            seeds[np.arange(len(cls)), :, cls] = 1.0
            r = self.vjp(x, seeds, rules=rules)
            yield cls, r.grads[self.input_name]

    # -- graph facts for methods ---------------------------------------------------------
    @property
    def layouts(self):
        """How the model lays out its 4-D tensors (``methods.cam.Layouts``), read once."""
        if self._layouts is None:
            from .methods.cam import Layouts

            self._layouts = Layouts(self.model)
        return self._layouts

    def default_cam_layer(self) -> str:
        """The last 4-D activation before global pooling (Grad-CAM's default layer), among the
        4-D tensors whose layout the graph tells (``methods.cam.Layouts``): a ViT's attention
        tensors are 4-D too, but not images, and mix the batch with the tokens. Found once."""
        if self._cam_layer is None:
            self._cam_layer = self._find_cam_layer()
        return self._cam_layer

    def _find_cam_layer(self) -> str:
        m = self.model
        layouts = self.layouts
        try:
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
        except Exception:
            inferred = m
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in inferred.graph.value_info}
        pools = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "AveragePool", "Flatten", "Reshape")
        inits = {i.name for i in m.graph.initializer}
        # tensor -> is a 4-D activation with a known layout; the model's own image input (inside
        # the prepended preprocessing) is one by the inspection (an MLP has no other)
        image = {self.input_spec.name: self.input_spec.name != self.input_name}

        def is_image(t: str) -> bool:
            if t not in image:
                image[t] = ranks.get(t) == 4 and t not in inits and t != self.input_name \
                    and layouts.evidence(t) is not None
            return image[t]

        best = None
        # global pooling first: the Flatten/Reshape after it would otherwise pick the
        # pooled [N, K, 1, 1] tensor
        for group in (pools[:3], pools[3:]):
            for node in inferred.graph.node:
                if node.op_type in group and node.input and is_image(node.input[0]):
                    best = node.input[0]
            if best is not None:
                break
        dims = {vi.name: [dim_of(d) for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
        cands = [n.output[0] for n in inferred.graph.node if n.output and ranks.get(n.output[0]) == 4]
        if best is None:
            best = next((c for c in reversed(cands) if is_image(c)), None)
            if best is None:
                raise ModelError("the model has no 4-D activation with an image layout for Grad-CAM; "
                                 "name one with --layer")

        def spatial(t):  # (h, w) of a 4-D tensor in its own layout
            d = dims.get(t, [None] * 4)
            return d[1:3] if layouts.evidence(t) == 3 else d[2:]

        if spatial(best) == [1, 1]:
            # a 1x1 activation (small inputs) gives a constant map: take the last larger one
            order = {name: i for i, name in enumerate(cands)}
            bigger = [c for c in cands if order[c] < order.get(best, len(cands))
                      and any(not isinstance(v, int) or v > 1 for v in spatial(c)) and is_image(c)]
            if bigger:
                best = bigger[-1]
        return best
