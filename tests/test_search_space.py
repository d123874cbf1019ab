"""SearchSpace: the enumeration, vectorised costs against `Arch`, and POP's partial order."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from naslung import Arch
from naslung.search.space import SearchSpace


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace()


@pytest.fixture(scope="module")
def small() -> SearchSpace:
    return SearchSpace((4, 8, 16), 3, 5)


FULL = SearchSpace()  # hypothesis strategies need the size before fixtures exist
FULL_PARAMS, FULL_FLOPS = FULL.params(), FULL.flops()
index = st.integers(0, len(FULL) - 1)


def test_original_space_has_101529_archs(space):
    assert len(space) == 101_529


def test_every_row_is_a_valid_distinct_arch(space):
    codes, lengths = space.codes.astype(int), space.stage_lengths.astype(int)
    depth = (codes >= 0).sum(1)
    assert ((codes >= -1) & (codes < len(space.widths))).all()
    assert (codes[:, :3] >= 0).all()
    assert (np.diff((codes >= 0).astype(int), axis=1) <= 0).all()  # -1 only after the last block
    steps = np.diff(codes, axis=1)
    assert ((steps >= 0) | (codes[:, 1:] == -1)).all()  # widths never decrease
    assert (lengths >= 1).all() and (lengths.sum(1) == depth).all()
    assert depth.min() == 3 and depth.max() == 9
    assert len(np.unique(np.concatenate([codes, lengths], axis=1), axis=0)) == len(space)


def test_arch_index_round_trip(space):
    rng = np.random.default_rng(0)
    for i in [0, len(space) - 1, *rng.integers(len(space), size=200)]:
        arch = space.arch(i)
        assert 3 <= arch.depth <= 9 and all(stage for stage in arch.stages)
        assert list(arch.widths) == sorted(arch.widths)
        assert space.index(arch) == i == space.index(str(arch))


@pytest.mark.parametrize("arch, message", [
    ("4/8,8/16,32,32,32,64,64,128", "depth 10, outside this space's 3..9"),
    ("4/8/12", "widths outside"),
    ("4/16/8", "never decrease"),
])
def test_index_rejects_archs_outside_the_space(space, arch, message):
    with pytest.raises(ValueError, match=message):
        space.index(arch)


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": (8, 4)}, "strictly increasing"),
    ({"widths": ()}, "non-empty"),
    ({"widths": (2, 4)}, ">= 4"),
    ({"min_depth": 2}, "min_depth"),
    ({"min_depth": 6, "max_depth": 5}, "min_depth"),
])
def test_bad_space_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)


def test_bad_index_is_rejected(space):
    with pytest.raises(ValueError, match="outside this space of 101529"):
        space.arch(len(space))
    with pytest.raises(ValueError, match="outside"):
        space.below(-1)


def test_vectorised_costs_equal_arch_costs(space):
    params, params_linear = space.params(), space.params("linear")
    flops, flops_64 = space.flops(), space.flops(64, "linear")
    rng = np.random.default_rng(1)
    extremes = [0, len(space) - 1, params.argmin(), params.argmax(), flops.argmin(), flops.argmax()]
    for i in [*extremes, *rng.integers(len(space), size=200)]:
        arch = space.arch(i)
        assert params[i] == arch.params() and params_linear[i] == arch.params("linear")
        assert flops[i] == arch.flops() and flops_64[i] == arch.flops(64, "linear")
    assert params.max() == Arch.parse("128,128,128,128,128,128,128/128/128").params()


def narrowed(arch: Arch, block: int, widths: tuple[int, ...]) -> Arch | None:
    """``arch`` with one block made as narrow as its predecessor allows, or None if it cannot shrink."""
    flat = list(arch.widths)
    floor = flat[block - 1] if block else widths[0]
    if flat[block] == floor:
        return None
    flat[block] = floor
    return _restage(arch, flat, [len(s) for s in arch.stages])


def _restage(arch: Arch, flat: list[int], lengths: list[int]) -> Arch:
    ends = np.cumsum(lengths)
    return Arch(tuple(tuple(flat[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)))


@settings(max_examples=60, deadline=None)
@given(index, st.data())
def test_narrowing_or_deleting_one_block_goes_below(i, data):
    arch = FULL.arch(i)
    block = data.draw(st.integers(0, arch.depth - 1))
    smaller = narrowed(arch, block, FULL.widths)
    if smaller is not None:
        assert FULL.below(i)[FULL.index(smaller)]
    lengths = [len(s) for s in arch.stages]
    stage = int(np.searchsorted(np.cumsum(lengths), block, side="right"))
    if lengths[stage] > 1 and arch.depth > FULL.min_depth:
        lengths[stage] -= 1
        shallower = _restage(arch, [w for k, w in enumerate(arch.widths) if k != block], lengths)
        assert FULL.below(i)[FULL.index(shallower)]


@settings(max_examples=60, deadline=None)
@given(index, st.data())
def test_order_is_a_partial_order_and_costs_are_monotone(i, data):
    params, flops = FULL_PARAMS, FULL_FLOPS
    below_i = FULL.below(i)
    assert below_i[i]  # reflexive
    j = data.draw(st.sampled_from(np.flatnonzero(below_i).tolist()))
    below_j = FULL.below(j)
    assert j == i or not below_j[i]  # antisymmetric
    k = data.draw(st.sampled_from(np.flatnonzero(below_j).tolist()))
    assert below_i[k]  # transitive
    assert params[j] <= params[i] and flops[j] <= flops[i]
    assert (params[below_i] <= params[i]).all() and (flops[below_i] <= flops[i]).all()


def embeds(small: tuple[int, ...], large: tuple[int, ...]) -> bool:
    """Brute force: some subsequence of ``large`` is elementwise >= ``small``."""
    return any(all(a <= large[p] for a, p in zip(small, pos, strict=True))
               for pos in combinations(range(len(large)), len(small)))


def test_below_matches_brute_force_on_a_small_space(small):
    archs = [small.arch(i) for i in range(len(small))]
    for i, big in enumerate(archs):
        expected = [all(embeds(s, b) for s, b in zip(a.stages, big.stages, strict=True)) for a in archs]
        assert small.below(i).tolist() == expected, big
