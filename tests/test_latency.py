"""The latency cost model: block decomposition, vectorised prediction, JSON cache, rank correlation.

Timings use tiny spaces, 16^3 crops and few repeats; the correlation test times with one thread so
that another process on a shared 2-core machine slows models and blocks alike instead of stalling
torch's thread pool.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from naslung import Arch, ConvRes
from naslung.search import latency as lat
from naslung.search.latency import (
    Block,
    LatencyCacheError,
    LatencyTable,
    arch_blocks,
    build_block,
    decompose,
    latency_table,
    measure_model_latency,
    predict,
    predict_arch,
    rank_correlation,
    search_cost,
    space_blocks,
)
from naslung.search.space import SearchSpace

FAST = {"crop": 16, "warmup": 1, "repeats": 3}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache root for each test."""
    monkeypatch.setenv("NASLUNG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency"


@pytest.fixture
def counted(monkeypatch):
    """Counts the blocks and models timed."""
    calls = []
    timer = lat.median_latencies_ms

    def counting(fns, *args, **kwargs):
        calls.extend([1] * len(fns))
        return timer(fns, *args, **kwargs)

    monkeypatch.setattr(lat, "median_latencies_ms", counting)
    return calls


def fake_table(space: SearchSpace, seed: int = 0) -> LatencyTable:
    """A table with random 'latencies' for every block of ``space``, nothing measured."""
    rng = np.random.default_rng(seed)
    table = LatencyTable(lat.current_facts(crop=16))
    table.blocks = {key: float(rng.uniform(0.01, 10)) for key in space_blocks(space)}
    return table


@pytest.mark.parametrize("key", ["stem", "down:s0:4", "res:s1:16->32", "cbam:s2:64", "head:128"])
def test_block_keys_round_trip(key):
    assert Block.parse(key).key == key


@pytest.mark.parametrize("key", ["", "res:s3:4->8", "res:s1:16-32", "down:4", "head:0", "stem:4"])
def test_bad_block_keys(key):
    with pytest.raises(ValueError):
        Block.parse(key)


@pytest.mark.parametrize("cbam, head", [("nas-lung", "asoftmax"), ("woo", "linear")])
def test_blocks_are_exactly_the_convres_forward_pass(cbam, head):
    """For random archs: the blocks' submodules hold every parameter and buffer of ConvRes once,
    running them in order is ConvRes.forward, and `build_block` builds the same modules."""
    space = SearchSpace(widths=(4, 8, 16), min_depth=3, max_depth=6)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(space), 5, replace=False):
        arch = space.arch(int(index))
        torch.manual_seed(0)
        model = ConvRes(arch, cbam=cbam, head=head).eval()
        parts = decompose(arch)
        prefixes = [name for _, names in parts for name in names]
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:
            assert sum(name.startswith(p + ".") for p in prefixes) == 1, name
        assert all(len(list(model.get_submodule(p).modules())) for p in prefixes)

        x = torch.randn(2, 1, 16, 16, 16)
        with torch.inference_mode():
            y = x
            for block, names in parts:
                built, shape = build_block(block, crop=16, batch=2, cbam=cbam, head=head)
                assert tuple(y.shape) == shape, block.key
                ours = [m for n in names for m in model.get_submodule(n).modules()]
                containers = (torch.nn.Sequential, torch.nn.Flatten)
                theirs = [m for m in built.modules() if not isinstance(m, containers)]
                ours = [m for m in ours if not isinstance(m, containers)]
                assert [type(m) for m in ours] == [type(m) for m in theirs], block.key
                assert [p.shape for m in ours for p in m.parameters(recurse=False)] == \
                       [p.shape for m in theirs for p in m.parameters(recurse=False)], block.key
                for name in names:
                    y = model.get_submodule(name)(y)
                    if name == "pool":
                        y = y.flatten(1)
            torch.testing.assert_close(y, model(x), rtol=0, atol=0)
        assert arch_blocks(arch) == [block.key for block, _ in parts]
        assert arch_blocks(str(arch)) == arch_blocks(arch)


def test_space_blocks_are_the_union_of_the_archs_blocks():
    space = SearchSpace(widths=(4, 8, 32), min_depth=3, max_depth=5)
    union = set()
    for i in range(len(space)):
        union.update(arch_blocks(space.arch(i)))
    assert space_blocks(space) == sorted(union)


def test_the_original_space_has_about_a_hundred_blocks():
    keys = space_blocks(SearchSpace())
    assert len(keys) == 101
    assert "res:s0:4->128" in keys and "down:s0:4" in keys and "down:s0:8" not in keys


def test_predict_agrees_with_predict_arch():
    space = SearchSpace(widths=(4, 8, 16, 32), min_depth=3, max_depth=6)
    table = fake_table(space)
    predicted = predict(space, table)
    assert predicted.dtype == np.float64 and predicted.shape == (len(space),)
    expected = [predict_arch(space.arch(i), table) for i in range(len(space))]
    np.testing.assert_allclose(predicted, expected, rtol=1e-12)


def test_predict_works_without_the_stem_width_in_the_space():
    space = SearchSpace(widths=(8, 16), min_depth=3, max_depth=4)
    table = fake_table(space, seed=1)
    assert "res:s0:4->8" in table.blocks
    np.testing.assert_allclose(predict(space, table), [predict_arch(space.arch(i), table)
                                                       for i in range(len(space))], rtol=1e-12)


def test_a_missing_block_is_an_error():
    space = SearchSpace(widths=(4, 8), min_depth=3, max_depth=4)
    table = fake_table(space)
    del table.blocks["res:s1:4->8"]
    with pytest.raises(ValueError, match="lacks 1 block.*res:s1:4->8"):
        predict(space, table)
    with pytest.raises(ValueError, match="res:s1:4->8"):
        predict_arch("4/4,8/8", table)
    assert table.missing(space) == ["res:s1:4->8"]


def test_cache_round_trip_and_reuse(cache, counted):
    space = SearchSpace(widths=(4, 8), min_depth=3, max_depth=4)
    table = latency_table(space, progress=False, **FAST)
    n_blocks = len(space_blocks(space))
    assert len(counted) == n_blocks
    assert table.covers(space) and all(ms > 0 for ms in table.blocks.values())
    (path,) = cache.glob("*.json")
    assert path == lat.cache_path(table.facts)
    assert "b1-crop16-nas-lung-asoftmax" in path.name
    data = json.loads(path.read_text())
    assert data["facts"] == lat.current_facts(crop=16)
    assert data["settings"]["warmup"] == 1 and data["settings"]["repeats"] == 3
    assert data["seconds_measuring"] > 0 and data["seconds_waiting_for_cpu"] >= 0
    mtime = path.stat().st_mtime_ns

    again = latency_table(space, progress=False, **FAST)
    assert len(counted) == n_blocks  # nothing re-measured
    assert path.stat().st_mtime_ns == mtime
    assert again.blocks == table.blocks and again.facts == table.facts
    loaded = LatencyTable.load(path, lat.current_facts(crop=16))
    assert loaded.blocks == table.blocks and (loaded.warmup, loaded.repeats) == (1, 3)
    np.testing.assert_array_equal(predict(space, loaded), predict(space, table))


def test_cache_is_extended_with_only_the_missing_blocks(cache, counted):
    small = SearchSpace(widths=(4, 8), min_depth=3, max_depth=3)
    big = SearchSpace(widths=(4, 8, 16), min_depth=3, max_depth=4)
    first = latency_table(small, progress=False, **FAST)
    assert len(counted) == len(space_blocks(small))
    grown = latency_table(big, progress=False, crop=16, warmup=2, repeats=5)
    assert len(counted) == len(space_blocks(big))  # the small space's blocks were reused
    assert set(space_blocks(small)) < set(space_blocks(big))
    assert all(grown.blocks[key] == ms for key, ms in first.blocks.items())
    assert (grown.warmup, grown.repeats) == (1, 3)  # a table keeps its settings when extended
    assert LatencyTable.load(next(cache.glob("*.json"))).covers(big)


def test_a_cache_with_other_facts_is_refused(cache, counted):
    space = SearchSpace(widths=(4, 8), min_depth=3, max_depth=3)
    table = latency_table(space, progress=False, **FAST)
    path = lat.cache_path(table.facts)
    data = json.loads(path.read_text())
    data["facts"]["device_name"] = "some other CPU"
    path.write_text(json.dumps(data))
    facts = lat.current_facts(crop=16)
    with pytest.raises(LatencyCacheError, match="device_name"):
        LatencyTable.load(path, facts)

    other = LatencyTable.load(path)  # readable when not checked ...
    with pytest.raises(ValueError, match="other facts"):
        other.measure(["head:64"], progress=False)  # ... but never extended here
    with pytest.raises(ValueError, match="other facts"):
        rank_correlation(space, other, sample=3, progress=False)

    n = len(counted)
    fresh = latency_table(space, progress=False, **FAST)  # ignored, measured anew, replaced
    assert len(counted) == n + len(space_blocks(space))
    assert fresh.facts == facts and LatencyTable.load(path, facts).blocks == fresh.blocks

    path.write_text("{not json")
    with pytest.raises(LatencyCacheError, match="not a latency table"):
        LatencyTable.load(path, facts)
    latency_table(space, progress=False, **FAST)
    assert len(counted) == n + 2 * len(space_blocks(space))


def test_other_settings_get_their_own_cache(cache):
    space = SearchSpace(widths=(4,), min_depth=3, max_depth=3)
    threads = torch.get_num_threads()
    latency_table(space, progress=False, **FAST)
    latency_table(space, progress=False, cbam="woo", head="linear", **FAST)
    latency_table(space, progress=False, batch=2, **FAST)
    one = latency_table(space, progress=False, threads=threads + 1, **FAST)
    assert one.facts["threads"] == threads + 1 and f"-{threads + 1}t-" in lat.cache_path(one.facts).name
    assert torch.get_num_threads() == threads  # set for the timing only
    assert len(list(cache.glob("*.json"))) == 4


def test_measuring_leaves_the_global_rng_alone(cache):
    state = torch.random.get_rng_state()
    latency_table(SearchSpace(widths=(4,), min_depth=3, max_depth=3), progress=False, **FAST)
    measure_model_latency("4/4/4", crop=16, warmup=0, repeats=1)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kwargs", [
    {"device": "tpu"}, {"device": "mps"}, {"device": "not a device"}, {"batch": 0}, {"batch": 1.5},
    {"crop": 0}, {"cbam": "se"}, {"head": "arcface"}, {"warmup": -1}, {"repeats": 0}, {"threads": 0},
])
def test_bad_settings_are_value_errors(kwargs, cache):
    space = SearchSpace(widths=(4,), min_depth=3, max_depth=3)
    with pytest.raises(ValueError):
        latency_table(space, progress=False, **{**FAST, **kwargs})
    with pytest.raises(ValueError):
        measure_model_latency("4/4/4", **{**FAST, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_value_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        lat.current_facts("cuda")


def test_search_cost_objectives():
    space = SearchSpace(widths=(4, 8), min_depth=3, max_depth=4)
    table = fake_table(space)
    np.testing.assert_array_equal(search_cost(space, "params"), space.params())
    np.testing.assert_array_equal(search_cost(space, "flops", crop=16), space.flops(16))
    np.testing.assert_array_equal(search_cost(space, "latency", crop=16, table=table), predict(space, table))
    with pytest.raises(ValueError, match="needs a LatencyTable"):
        search_cost(space, "latency")
    with pytest.raises(ValueError, match="crop 16"):
        search_cost(space, "latency", table=table)  # table for crop 16, search at 32
    with pytest.raises(ValueError, match="unknown objective"):
        search_cost(space, "energy")


def test_bad_sample_sizes():
    space = SearchSpace(widths=(4, 8), min_depth=3, max_depth=3)
    table = fake_table(space)
    for sample in (2, len(space) + 1):
        with pytest.raises(ValueError, match="sample"):
            rank_correlation(space, table, sample=sample, progress=False)


def test_rank_correlation_compares_predicted_with_measured_models(cache):
    """The machinery only: which archs, their predictions and real measurements. How well the
    table ranks archs is a timing, so it is reported by bench/test_bench_latency.py and
    `naslung latency`, never asserted here."""
    space = SearchSpace(widths=(4, 32), min_depth=3, max_depth=4)
    table = latency_table(space, progress=False, crop=16, threads=1, warmup=1, repeats=3)
    result = rank_correlation(space, table, sample=8, seed=0, progress=False)
    assert result.cpu_wait_fraction is None or result.cpu_wait_fraction >= 0
    assert len(result.indices) == 8 and len(set(result.indices.tolist())) == 8
    np.testing.assert_array_equal(result.predicted, predict(space, table)[result.indices])
    assert np.all(np.isfinite(result.measured) & (result.measured > 0))
    assert -1 <= result.rho <= 1
    again = rank_correlation(space, table, sample=8, seed=0, warmup=0, repeats=1, progress=False)
    np.testing.assert_array_equal(again.indices, result.indices)  # seeded


def test_whole_model_latency_is_a_positive_time():
    for arch in (Arch.parse("4/4/4"), "32,32/32/32"):
        ms = measure_model_latency(arch, crop=16, warmup=1, repeats=3)
        assert np.isfinite(ms) and ms > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_event_timing(cache):
    space = SearchSpace(widths=(4, 32), min_depth=3, max_depth=4)
    table = latency_table(space, "cuda", progress=False, crop=32, warmup=3, repeats=10)
    assert table.facts["device"] == "cuda" and table.facts["device_name"] == torch.cuda.get_device_name()
    assert all(ms > 0 for ms in table.blocks.values())
    assert "cuda" in lat.cache_path(table.facts).name
    result = rank_correlation(space, table, sample=10, seed=0, progress=False)
    assert np.all(result.measured > 0) and np.isfinite(result.rho)
