"""Streaming data: the same arrays as the eager loader for every kind of source, shards that
read only their own slice, labels from class folders and CSV files, bad rows and missing files
as per-image failures, and benchmark results that do not depend on how the data is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxsal.data.sources as sources_mod
from onnxsal.benchmark import run_benchmark
from onnxsal.data import (
    NpzSource,
    SliceReader,
    load_dataset,
    open_source,
    stream_dataset,
)
from onnxsal.data.npz import _Member
from onnxsal.errors import InputError

DATA = Path(__file__).parent / "data"
MODEL = DATA / "digits_cnn.onnx"
SAMPLE = DATA / "digits_sample.npz"


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A class-folder tree (3 classes, grey and RGB PNGs of two sizes, one corrupt file) and a
    flat folder of the same files."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    files = []
    for cls in ["cat", "dog", "eel"]:
        for k in range(7):
            shape = (20, 24) if k % 2 else (16, 16, 3)
            f = root / cls / f"{k}.png"
            _write(f, rng.integers(0, 256, shape, dtype=np.uint8))
            files.append(f)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    flat = tmp_path_factory.mktemp("flat")
    for f in files[:9]:
        (flat / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    return root, flat, files


def _same(eager, streamed) -> None:
    back = streamed.read()
    np.testing.assert_array_equal(eager.images, back.images)
    if eager.labels is None:
        assert streamed.labels is None and back.labels is None
    else:
        np.testing.assert_array_equal(eager.labels, streamed.labels)
        np.testing.assert_array_equal(eager.labels, back.labels)
    assert eager.names == streamed.names == back.names
    assert eager.fingerprint() == streamed.fingerprint() == back.fingerprint()
    assert eager.describe() == streamed.describe()


def _npz(tmp_path, compressed, **arrays):
    p = tmp_path / ("c.npz" if compressed else "u.npz")
    (np.savez_compressed if compressed else np.savez)(p, **arrays)
    return p


@pytest.mark.parametrize("shape", [(3, 12, 12), (1, 16, 16), None])
def test_folders_stream_the_eager_arrays(folders, shape):
    root, flat, files = folders
    for data, shp in [(root, shape), (flat, shape), ([str(f) for f in files[:5]], shape)]:
        if shp is None:
            shp = (None, 12, 12)  # the images' sizes differ: a dynamic size is refused
        eager = load_dataset(data, shp)
        _same(eager, stream_dataset(data, shp, batch=4))
    # the limit counts usable images, as the eager loader does
    _same(load_dataset(root, (3, 8, 8), limit=9), stream_dataset(root, (3, 8, 8), limit=9, batch=4))


def test_mixed_sizes_with_a_dynamic_size_is_refused_in_one_line(folders):
    with pytest.raises(InputError, match="different sizes"):
        stream_dataset(folders[1], None)


def test_dynamic_channels_take_rgb_when_any_image_is_rgb(tmp_path):
    # grey first, then RGB: the pass that assumed grey starts again with RGB, as eager does
    _write(tmp_path / "a.png", np.full((8, 8), 100, np.uint8))
    _write(tmp_path / "b.png", np.full((8, 8, 3), 50, np.uint8))
    eager = load_dataset(tmp_path, None)
    assert eager.shape == (3, 8, 8)
    _same(eager, stream_dataset(tmp_path, None, batch=1))


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC-float", "fortran"])
def test_npz_streams_the_eager_arrays(tmp_path, compressed, layout):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (23, 9, 10), dtype=np.uint8)
    if layout == "NCHW":
        x = rng.integers(0, 256, (23, 3, 9, 10), dtype=np.uint8)
    elif layout == "NHWC-float":
        x = rng.random((23, 9, 10, 3)).astype(np.float32)
        x[4, 0, 0, 0] = np.nan  # one bad image: a per-image failure
    elif layout == "fortran":
        x = np.asfortranarray(x)
    y = rng.integers(0, 5, 23)
    p = _npz(tmp_path, compressed, x=x, y=y, names=np.array([f"im{i}" for i in range(23)]))
    eager = load_dataset(p, (3, 9, 10))
    s = stream_dataset(p, (3, 9, 10), batch=5)
    _same(eager, s)
    member = open_source(p).meta["x"]
    assert member.stored == (not compressed)
    if layout == "NHWC-float":
        assert [n for n, _ in s.failures] == ["im4"] and "NaN" in s.failures[0][1]


def test_npz_refusals_are_unchanged(tmp_path):
    p = _npz(tmp_path, False, x=np.full((3, 4, 4), 300, np.int32))
    with pytest.raises(InputError, match="must hold 0..255"):
        stream_dataset(p, None)
    p = _npz(tmp_path, True, x=np.full((3, 4, 4), 2.0, np.float32))
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
        load_dataset(p, None)


def test_builtins_stream_the_eager_arrays():
    _same(load_dataset("digits", (1, 8, 8), limit=70), stream_dataset("digits", (1, 8, 8), limit=70))
    _same(load_dataset("fashion-mnist", (3, 14, 14), limit=40),
          stream_dataset("fashion-mnist", (3, 14, 14), limit=40, batch=16))
    _same(load_dataset(SAMPLE, (1, 8, 8)), stream_dataset(SAMPLE, (1, 8, 8)))


def test_a_shard_decodes_only_its_own_files(folders, monkeypatch):
    root = folders[0]
    s = stream_dataset(root, (3, 8, 8))
    opened: list[str] = []
    real = sources_mod.read_image_file

    def counting(f, name):
        opened.append(name)
        return real(f, name)

    monkeypatch.setattr(sources_mod, "read_image_file", counting)
    reader = s.reader(slice(5, 9))
    ds = reader.read()
    assert opened == s.names[5:9] == ds.names
    np.testing.assert_array_equal(ds.labels, s.labels[5:9])
    # a reader is small: the items of its slice only, whatever the size of the data set
    assert isinstance(reader, SliceReader) and len(reader.items.files) == 4


def test_an_npz_shard_reads_only_its_rows(tmp_path, monkeypatch):
    x = np.arange(40 * 6 * 6, dtype=np.uint8).reshape(40, 6, 6)
    p = _npz(tmp_path, False, x=x)
    s = stream_dataset(p, (1, 6, 6), batch=8)
    asked: list[tuple[int, int]] = []
    real = _Member.rows

    def rows(self, start, stop):
        asked.append((start, stop))
        return real(self, start, stop)

    monkeypatch.setattr(_Member, "rows", rows)
    got = s.read(slice(30, 35))
    assert asked == [(30, 35)]
    np.testing.assert_array_equal(got.images[:, 0], x[30:35] / np.float32(255))


def test_labels_from_class_folders_and_csv(folders, tmp_path):
    root, _, files = folders
    s = stream_dataset(root, (1, 8, 8))
    assert s.class_names == ["cat", "dog", "eel"]
    assert [s.class_names[k] for k in s.labels] == [Path(n).parts[0] for n in s.names]
    assert len(s) == 21 and [n for n, _ in s.failures] == [str(Path("dog") / "broken.png")]
    # CSV: a header, class names as labels, paths relative to the CSV's folder or absolute
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(
        f"{f.relative_to(root.parent) if i % 2 else f},{f.parent.name}\n"
        for i, f in enumerate(files[::3])))
    (root.parent / "list.csv").write_text(csv.read_text())
    s = stream_dataset(root.parent / "list.csv", (1, 8, 8))
    assert s.class_names == ["cat", "dog", "eel"]
    assert [s.class_names[k] for k in s.labels] == [f.parent.name for f in files[::3]]
    _same(load_dataset(root.parent / "list.csv", (1, 8, 8)), s)
    # integer labels; a .txt list has none
    csv.write_text("".join(f"{f},{i % 4}\n" for i, f in enumerate(files[:6])))
    s = stream_dataset(csv, (1, 8, 8))
    assert s.class_names is None and s.labels.tolist() == [0, 1, 2, 3, 0, 1]
    txt = tmp_path / "list.txt"
    txt.write_text("".join(f"{f}\n" for f in files[:3]))
    assert stream_dataset(txt, (1, 8, 8)).labels is None


def test_bad_csv_rows_and_missing_files_are_per_image_failures(folders, tmp_path):
    files = folders[2]
    csv = tmp_path / "bad.csv"
    csv.write_text(f"{files[0]},0\n"
                   f"{tmp_path / 'gone.png'},1\n"       # missing file
                   f"{files[1]},1,extra\n"              # three fields
                   f"{files[2]}\n"                      # no label while the others have one
                   f"{files[3]},-2\n"                   # a negative class index
                   f"{folders[0] / 'dog' / 'broken.png'},1\n"  # not an image
                   f"{files[4]},2\n")
    eager = load_dataset(csv, (1, 8, 8))
    s = stream_dataset(csv, (1, 8, 8))
    _same(eager, s)
    assert s.labels.tolist() == [0, 2]
    why = dict(s.failures)
    assert len(why) == 5
    assert why[str(tmp_path / "gone.png")] == "no such file"
    assert "line 3: expected 'path,label', got 3 fields" in why[str(files[1])]
    assert "line 4: no label" in why[str(files[2])]
    assert "negative class index" in why[str(files[3])]
    assert "unreadable image" in why[str(folders[0] / "dog" / "broken.png")]
    assert all("\n" not in e for e in why.values())
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(InputError, match="no rows"):
        stream_dataset(empty, None)


def test_a_file_changed_after_the_pass_is_an_error_not_wrong_numbers(tmp_path):
    for k in range(4):
        _write(tmp_path / f"{k}.png", np.full((8, 8), 40 * k, np.uint8))
    s = stream_dataset(tmp_path, (1, 8, 8))
    _write(tmp_path / "2.png", np.full((8, 8), 7, np.uint8))
    s.read(slice(0, 2))  # untouched images read fine
    with pytest.raises(InputError, match="2.png: its pixels differ"):
        s.read(slice(2, 4))
    (tmp_path / "3.png").unlink()
    with pytest.raises(InputError, match="3.png: read before, now it fails"):
        s.read(slice(3, 4))


def test_benchmark_results_do_not_depend_on_streaming(tmp_path):
    """The bundled model on the bundled digits: the path (streamed, each shard reading its
    slice) and the same data in memory give identical results.json numbers."""
    kw = dict(limit=40, progress=False, shard_size=16, threads=1, device="cpu")
    res_s = run_benchmark([MODEL], str(SAMPLE), ["original", "positive"], out_dir=tmp_path / "s", **kw)
    ds = load_dataset(SAMPLE, (1, 20, 20), limit=40)
    run_benchmark([MODEL], ds, ["original", "positive"], out_dir=tmp_path / "e", **kw)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("s", "e"))
    for r in (a, b):
        r.pop("timing")
    for k in a:
        assert a[k] == b[k], k
    assert a == b
    assert res_s["data"]["count"] == 40 and len(res_s["results"]) == 2
    assert (tmp_path / "s" / "curves.csv").read_text() == (tmp_path / "e" / "curves.csv").read_text()


def test_remote_groups_carry_a_reader_or_the_images():
    from onnxsal.benchmark import MetricSpec, ShardGroup
    from onnxsal.runs import EngineSpec

    s = stream_dataset(SAMPLE, (1, 8, 8))
    base = dict(model_index=0, model_name="m", engine=EngineSpec("k", "h"), start=0, stop=8,
                methods=("original",), images=None, labels=s.labels[:8], seed=0,
                metric=MetricSpec(), reader=s.reader(slice(0, 8)))
    on = ShardGroup(**base, read_on_worker=True)
    assert on.for_remote() is on and on.images is None  # the worker reads its slice
    off = ShardGroup(**base, read_on_worker=False).for_remote()
    assert off.reader is None
    np.testing.assert_array_equal(off.images, load_dataset(SAMPLE, (1, 8, 8)).images[:8])


def test_npz_source_pickles_small(tmp_path):
    import pickle

    x = np.zeros((500, 8, 8), np.uint8)
    p = _npz(tmp_path, False, x=x)
    src = NpzSource(p).take([3, 4])
    back = pickle.loads(pickle.dumps(src))
    assert back.names == ["x[3]", "x[4]"] and len(pickle.dumps(src)) < 12_000


def test_in_memory_data_streams_too():
    from onnxsal.data import load_raw

    d = load_dataset("digits", (1, 8, 8), limit=30)
    _same(load_dataset(d, (3, 16, 16)), stream_dataset(d, (3, 16, 16), batch=7))
    raw = load_raw(SAMPLE, limit=12)
    raw.failures.append(("earlier", "a failure found when it was read"))
    _same(load_dataset(raw, (1, 10, 10)), stream_dataset(raw, (1, 10, 10)))
