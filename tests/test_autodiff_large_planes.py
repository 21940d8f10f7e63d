"""A convolution on a large static plane (a file may declare a 1M-pixel-high image) must not
make the gradient pass enumerate its taps in Python: the dense small-plane route is sized
first and refused before any loop (fuzz case 1637 of seed 20261202 ran for minutes)."""

import numpy as np

from onnxsal.autodiff.rules import conv_pool


def test_large_plane_is_refused_before_its_taps_are_enumerated(monkeypatch):
    def no_loop(*shape):
        raise AssertionError(f"taps enumerated for a plane of {shape}")

    monkeypatch.setattr(conv_pool.np, "ndindex", no_loop)
    w = np.ones((4, 3, 3, 3), np.float32)
    assert conv_pool._dense_conv_matrix(w, [1, 1], [1, 1], [1, 1], [1 << 20, 8], [1 << 20, 8], 1) is None


def test_tiny_plane_still_takes_the_dense_route():
    """A 3x3 convolution on a 2x2 plane: one dense matrix equal to the convolution."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    M = conv_pool._dense_conv_matrix(w, [1, 1], [1, 1], [1, 1], [2, 2], [2, 2], 1)
    assert M is not None and M.shape == (4 * 4, 3 * 4)
    x = rng.normal(size=(3, 2, 2)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    y = np.array([[[np.sum(w[o] * xp[:, i:i + 3, j:j + 3]) for j in range(2)] for i in range(2)]
                  for o in range(4)])
    np.testing.assert_allclose(M @ x.reshape(-1), y.reshape(-1), rtol=1e-5, atol=1e-5)
