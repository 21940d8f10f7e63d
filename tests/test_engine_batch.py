"""The CPU batch cap (onnxsal.runtime.CPU_BATCH_BYTES): the engine's batch on the CPU provider
holds at most ``cpu_batch_bytes`` of estimated activations per run, is overridable (argument,
$ONNXSAL_CPU_BATCH_BYTES, 0 for none), leaves other providers on the memory-budget rule, and
changes no result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxsal import runtime
from onnxsal.engine import Engine
from onnxsal.errors import OptionError

MODEL = Path(__file__).parent / "data" / "digits_cnn.onnx"


def _engine(**kw) -> Engine:
    return Engine(MODEL, device="cpu", use_disk_cache=False, **kw)


def _budget_batch(eng: Engine, seeds: int = 0) -> int:
    return max(1, eng.memory_budget // eng._bytes_per_run_image(seeds))


def test_default_cap_applies(monkeypatch):
    monkeypatch.delenv(runtime.CPU_BATCH_ENV, raising=False)
    eng = _engine()
    assert eng.cpu_batch_bytes == runtime.CPU_BATCH_BYTES > 0
    for seeds in (0, 1, 3):
        per = eng._bytes_per_run_image(seeds)
        want = max(1, min(_budget_batch(eng, seeds), runtime.CPU_BATCH_BYTES // per))
        assert eng.batch_size(seeds) == want
    # the digits CNN's budget batch (tens of thousands of images) is above the default cap
    assert eng.batch_size() < _budget_batch(eng)


def test_argument_overrides_and_zero_turns_off(monkeypatch):
    monkeypatch.setenv(runtime.CPU_BATCH_ENV, str(1 << 30))
    eng = _engine()
    per = eng._bytes_per_image
    small = _engine(cpu_batch_bytes=10 * per + per // 2)
    assert small.batch_size() == 10
    assert _engine(cpu_batch_bytes=1).batch_size() == 1  # never below one image
    assert _engine(cpu_batch_bytes=0).batch_size() == _budget_batch(eng)


def test_env_overrides(monkeypatch):
    per = _engine(cpu_batch_bytes=0)._bytes_per_image
    monkeypatch.setenv(runtime.CPU_BATCH_ENV, str(7 * per))
    assert _engine().batch_size() == 7
    monkeypatch.setenv(runtime.CPU_BATCH_ENV, "0")
    eng = _engine()
    assert eng.batch_size() == _budget_batch(eng)
    for bad in ("lots", "-5", "1.5"):
        monkeypatch.setenv(runtime.CPU_BATCH_ENV, bad)
        with pytest.raises(OptionError, match=runtime.CPU_BATCH_ENV):
            _engine()
    monkeypatch.delenv(runtime.CPU_BATCH_ENV)
    with pytest.raises(OptionError, match="cpu_batch_bytes"):
        _engine(cpu_batch_bytes=-1)


def test_parallel_parts_share_the_cap(monkeypatch):
    per = _engine(cpu_batch_bytes=0)._bytes_per_image
    eng = _engine(cpu_batch_bytes=5 * per, threads=2)
    assert eng.parallel == 2 and eng.batch_size() == 5
    # but each of the concurrent one-thread runs gets an image
    assert _engine(cpu_batch_bytes=1, threads=2).batch_size() == 2


def test_other_providers_keep_the_budget_rule():
    eng = _engine(cpu_batch_bytes=1)
    assert eng.batch_size() == 1
    eng.provider = "CUDAExecutionProvider"  # the rule is chosen by the engine's provider
    assert eng.batch_size() == _budget_batch(eng)
    assert eng.batch_size(2) == _budget_batch(eng, 2)


def test_split_changes_no_result():
    x = np.random.default_rng(0).random((23, 1, 20, 20), dtype=np.float32)
    whole = _engine(cpu_batch_bytes=0)
    per = whole._bytes_per_run_image(1)
    split = _engine(cpu_batch_bytes=4 * per)  # 4 images per gradient run: 6 runs, last one short
    assert split.batch_size(1) == 4 and whole.batch_size(1) >= len(x)
    np.testing.assert_array_equal(split.logits(x), whole.logits(x))
    (la, ga), (lb, gb) = split.gradient(x), whole.gradient(x)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ga, gb)  # each image is computed alone: bit-identical
