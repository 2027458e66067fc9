"""Blend weights: positive everywhere, a partition of unity across the cosine overlap."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.core.blend import MIN_WEIGHT, weights_1d, weights_2d


@given(tile=st.integers(2, 200), halo=st.integers(1, 60))
@settings(max_examples=200, deadline=None)
def test_cosine_tapers_sum_to_one_where_neighbours_overlap(tile: int, halo: int) -> None:
    if 2 * halo > tile:
        return
    size = tile + 2 * halo
    w = weights_1d(size, halo, "cosine")
    # tile A covers [0, size), tile B starts one stride (tile) later: they overlap on [tile, size)
    overlap_a = w[tile:]
    overlap_b = w[: size - tile]
    unclipped = (overlap_a > MIN_WEIGHT) & (overlap_b > MIN_WEIGHT)
    assert np.allclose((overlap_a + overlap_b)[unclipped], 1.0, atol=1e-9)
    assert (w[2 * halo : size - 2 * halo] == 1.0).all()


@pytest.mark.parametrize("blend", ["crop", "cosine", "gaussian"])
def test_weights_positive_and_symmetric(blend: str) -> None:
    w = weights_2d(96, 16, blend)  # type: ignore[arg-type]
    assert w.shape == (96, 96) and w.dtype == np.float32
    assert (w >= MIN_WEIGHT * MIN_WEIGHT).all()
    assert np.allclose(w, w[::-1, ::-1]) and np.allclose(w, w.T)


def test_unknown_blend() -> None:
    with pytest.raises(ValueError, match="blend must be one of"):
        weights_1d(10, 2, "linear")  # type: ignore[arg-type]
