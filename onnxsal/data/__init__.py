"""Images for explaining and benchmarking: folders, image files, CSV lists, ``.npz`` arrays,
built-in sets.

Everything comes out as one :class:`Dataset`: float32 images ``[N, C, H, W]`` in ``[0, 1]``,
int64 labels (or ``None``), one name per image, a description of the source, the conversions
that were made (``notes``) and the images that could not be used (``failures``). Loading is
two steps: :func:`load_raw` reads images at their own size and channel count, and
:func:`conform` brings them to a model's input shape (resizing with
``skimage.transform.resize``, grey <-> RGB, alpha dropped), reporting each conversion.

For data sets too large for memory, :func:`stream_dataset` gives the same data as a
:class:`StreamedDataset`: one streaming pass learns the names, labels, failures and
fingerprint, and the pixels are read again a slice at a time (``read``, ``batches``,
``reader``) by whoever needs them (a benchmark shard, a remote worker).

A corrupt or unreadable image, or one holding NaN or Inf, is listed in ``failures`` and the
rest go on; only a data set with no usable image at all is an error.

Modules: :mod:`~onnxsal.data.types` (the two containers), :mod:`~onnxsal.data.pixels` (one
image file or array to float HWC), :mod:`~onnxsal.data.sources` (lazy sources: files,
folders, CSV lists, arrays), :mod:`~onnxsal.data.npz` (``.npz`` read by slices),
:mod:`~onnxsal.data.builtins` (Fashion-MNIST, digits, scikit-image samples),
:mod:`~onnxsal.data.conform` (to a model's shape), :mod:`~onnxsal.data.loading` (the eager
entry points), :mod:`~onnxsal.data.stream` (streaming).
"""

from .builtins import (
    BUILTINS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    SKIMAGE_SAMPLES,
    digits_source,
    fashion_mnist_arrays,
    fashion_mnist_source,
    load_digits,
    load_fashion_mnist,
    load_skimage_samples,
)
from .conform import _convert_channels, _resize, conform
from .loading import iter_batches, load_dataset, load_raw, open_source
from .npz import NpzSource
from .pixels import IMAGE_SUFFIXES, MAX_PIXELS, ImageFailure, _read_image, _to_float_hwc, max_pixels
from .sources import ArraySource, DataSource, FileSource, folder_source, list_source
from .stream import SliceReader, StreamedDataset, per_shape, reads_on_workers, stream_dataset
from .types import Dataset, RawImages

__all__ = [
    "BUILTINS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_SUFFIXES", "MAX_PIXELS",
    "SKIMAGE_SAMPLES", "ArraySource", "DataSource", "Dataset", "FileSource", "ImageFailure",
    "NpzSource", "RawImages", "SliceReader", "StreamedDataset", "_convert_channels",
    "_read_image", "_resize", "_to_float_hwc", "conform", "digits_source", "fashion_mnist_arrays",
    "fashion_mnist_source", "folder_source", "iter_batches", "list_source", "load_dataset",
    "load_digits", "load_fashion_mnist", "load_raw", "load_skimage_samples", "max_pixels",
    "open_source", "per_shape", "reads_on_workers", "stream_dataset",
]
