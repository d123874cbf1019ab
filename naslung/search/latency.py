"""A latency cost model for the search: per-device block latencies, measured once, summed per arch.

The original NAS-Lung timed one cold CPU forward pass per arch and called it latency. Here a
ConvRes forward pass (eval mode, ``torch.inference_mode()``, input ``(batch, 1, crop, crop,
crop)``) is split into blocks whose latency depends only on their own shapes:

- ``stem``: the two stem ConvBNReLUs (1->4->4) and the stem CBAM, at crop^3;
- ``down:s{s}:{c}``: stage s's stride-2 ConvBNReLU(c, c), from the previous size to the next;
- ``res:s{s}:{cin}->{cout}``: a ResidualBlock(cin, cout) at stage s's size;
- ``cbam:s{s}:{c}``: stage s's CBAM(c);
- ``head:{c}``: global average pooling and the classifier head.

The original space of 101,529 archs holds only 101 distinct blocks, so each is timed once per
device (warm-up rounds, then the median of timed rounds, blocks interleaved; CUDA events on a
GPU, ``time.perf_counter`` on a CPU), the table is cached as JSON, and an arch's predicted
latency is the sum of its blocks' medians. `rank_correlation` checks the sum against timings
of whole models, and `search_cost` gives the search its cost array for params, flops or latency.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from naslung.arch import HEAD_KINDS, NUM_STAGES, STEM_WIDTH, Arch
from naslung.fileio import write_json
from naslung.models import CBAM_VARIANTS, ConvBNReLU, ConvRes, ResidualBlock, make_cbam, make_head
from naslung.paths import cache_root
from naslung.search.space import SearchSpace
from naslung.search.timing import (
    CpuWait,
    check_timing_settings,
    median_latencies_ms,
    runnable,
    torch_threads,
)
from naslung.versions import cpu_model

if TYPE_CHECKING:
    from rich.progress import Progress

FORMAT = 1
"""Version of the cache's JSON layout."""

DEVICE_TYPES = ("cpu", "cuda")
COST_OBJECTIVES = ("params", "flops", "latency")
FACT_KEYS = ("device", "device_name", "torch", "cuda", "cudnn", "gpu_flags", "threads", "dtype", "batch",
             "crop", "cbam", "head")
"""What a latency depends on; a table is used only where all of these match."""

DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 15
INTERLEAVED = 32
"""Blocks or models timed together in interleaved rounds (all of them live in memory at once)."""

_KEY = re.compile(r"stem|down:s(\d+):(\d+)|res:s(\d+):(\d+)->(\d+)|cbam:s(\d+):(\d+)|head:(\d+)")


class LatencyCacheError(ValueError):
    """A cached table that was measured under other facts (device, versions, settings)."""


@dataclass(frozen=True)
class Block:
    """One independently timed piece of ConvRes; ``stage`` is -1 for the stem and the head."""

    kind: str
    stage: int = -1
    cin: int = STEM_WIDTH
    cout: int = STEM_WIDTH

    @property
    def key(self) -> str:
        """The block's name in a `LatencyTable`, e.g. ``res:s1:16->32``."""
        if self.kind == "stem":
            return "stem"
        if self.kind == "res":
            return f"res:s{self.stage}:{self.cin}->{self.cout}"
        if self.kind == "head":
            return f"head:{self.cin}"
        return f"{self.kind}:s{self.stage}:{self.cin}"

    @classmethod
    def parse(cls, key: str) -> Block:
        """The block a key names; ValueError for anything else."""
        match = _KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{key!r} is not a block key (stem, down:s0:4, res:s1:16->32, cbam:s2:64, "
                             "head:128)")
        g = match.groups()
        if key == "stem":
            block = cls("stem")
        elif g[0] is not None:
            block = cls("down", int(g[0]), int(g[1]), int(g[1]))
        elif g[2] is not None:
            block = cls("res", int(g[2]), int(g[3]), int(g[4]))
        elif g[5] is not None:
            block = cls("cbam", int(g[5]), int(g[6]), int(g[6]))
        else:
            block = cls("head", -1, int(g[7]), int(g[7]))
        if block.kind != "stem" and block.kind != "head" and not 0 <= block.stage < NUM_STAGES:
            raise ValueError(f"block {key!r}: stage must be 0..{NUM_STAGES - 1}")
        if min(block.cin, block.cout) < 1:
            raise ValueError(f"block {key!r}: channels must be positive")
        return block


def spatial_sizes(crop: int) -> list[int]:
    """Edge length entering the stem, then after each stage's stride-2 (k3, p1) downsampling."""
    sizes = [crop]
    for _ in range(NUM_STAGES):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    return sizes


def decompose(arch: Arch) -> list[tuple[Block, tuple[str, ...]]]:
    """The blocks of ``arch`` in forward order, each with the `ConvRes` submodules it stands for.

    Running those submodules in this order (with a flatten between pooling and head) is exactly
    `ConvRes.forward`; `tests/test_latency.py` checks that, so the table times what the model runs.
    """
    parts: list[tuple[Block, tuple[str, ...]]] = [(Block("stem"), ("stem", "stem_cbam"))]
    channels = STEM_WIDTH
    for s, widths in enumerate(arch.stages):
        parts.append((Block("down", s, channels, channels), (f"stages.{s}.down",)))
        for b, width in enumerate(widths):
            parts.append((Block("res", s, channels, width), (f"stages.{s}.blocks.{b}",)))
            channels = width
        parts.append((Block("cbam", s, channels, channels), (f"stages.{s}.cbam",)))
    parts.append((Block("head", -1, channels, channels), ("pool", "head")))
    return parts


def arch_blocks(arch: Arch | str) -> list[str]:
    """The block keys of one arch, in forward order (a key repeats when a block does)."""
    arch = Arch.parse(arch) if isinstance(arch, str) else arch
    return [block.key for block, _ in decompose(arch)]


def build_block(block: Block | str, *, crop: int = 32, batch: int = 1, cbam: str = "nas-lung",
                head: str = "asoftmax") -> tuple[nn.Module, tuple[int, ...]]:
    """The module a block runs, built from the same classes as `ConvRes`, and its input shape."""
    block = Block.parse(block) if isinstance(block, str) else block
    sizes = spatial_sizes(crop)
    if block.kind == "stem":
        stem = nn.Sequential(ConvBNReLU(1, STEM_WIDTH), ConvBNReLU(STEM_WIDTH, STEM_WIDTH))
        return nn.Sequential(stem, make_cbam(STEM_WIDTH, cbam)), (batch, 1, crop, crop, crop)
    if block.kind == "head":
        module = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1), make_head(head, block.cin))
        size = sizes[NUM_STAGES]
    elif block.kind == "down":
        module = ConvBNReLU(block.cin, block.cin, 3, stride=2, bias=False)
        size = sizes[block.stage]
    elif block.kind == "res":
        module = ResidualBlock(block.cin, block.cout)
        size = sizes[block.stage + 1]
    else:
        module = make_cbam(block.cin, cbam)
        size = sizes[block.stage + 1]
    return module, (batch, block.cin, size, size, size)


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICE_TYPES)}") from error
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device type {dev.type!r}; latency tables are for "
                         f"{', '.join(DEVICE_TYPES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def current_facts(device: str | torch.device = "cpu", *, batch: int = 1, crop: int = 32,
                  cbam: str = "nas-lung", head: str = "asoftmax",
                  threads: int | None = None) -> dict[str, Any]:
    """Everything a block latency depends on, for this machine and these settings.

    ``threads`` is the torch CPU thread count to time with (None: the current one).
    """
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
        raise ValueError(f"crop must be an integer >= 1, got {crop!r}")
    if cbam not in CBAM_VARIANTS:
        raise ValueError(f"unknown CBAM variant {cbam!r}; choose from {', '.join(CBAM_VARIANTS)}")
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEAD_KINDS)}")
    dev = _device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    gpu_flags = "none"
    if dev.type == "cuda":  # they change which conv kernels run
        gpu_flags = (f"cudnn.benchmark={torch.backends.cudnn.benchmark},"
                     f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    return {
        "device": dev.type, "device_name": name, "torch": torch.__version__,
        "cuda": torch.version.cuda or "none", "cudnn": str(torch.backends.cudnn.version() or "none"),
        "gpu_flags": gpu_flags, "threads": threads, "dtype": "float32",
        "batch": batch, "crop": crop, "cbam": cbam, "head": head,
    }


def cache_path(facts: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/<device>-<name>-torch<v>-<threads>t-b<batch>-crop<crop>-<cbam>-<head>.json``.

    ``cache_dir`` defaults to ``naslung.paths.cache_root() / "latency"``. On a GPU the name also
    says ``cudnn-benchmark`` and ``no-tf32`` when those flags are set so.
    """
    flags = ""
    if facts["device"] == "cuda":
        flags += "-cudnn-benchmark" if "benchmark=True" in facts["gpu_flags"] else ""
        flags += "-no-tf32" if "allow_tf32=False" in facts["gpu_flags"] else ""
    name = (f"{facts['device']}-{facts['device_name']}-torch{facts['torch']}-{facts['threads']}t-"
            f"b{facts['batch']}-crop{facts['crop']}-{facts['cbam']}-{facts['head']}{flags}")
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9.+_-]", "-", name)).strip("-")
    return (Path(cache_dir) if cache_dir is not None else cache_root() / "latency") / f"{slug}.json"


def _progress(enabled: bool) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from naslung.console import console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not enabled)


@dataclass
class LatencyTable:
    """Median milliseconds per block key, with the facts and settings they were measured under."""

    facts: dict[str, Any]
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS
    blocks: dict[str, float] = field(default_factory=dict)
    seconds_measuring: float = 0.0
    """Wall time spent measuring the blocks in the table, extensions included."""
    seconds_waiting_for_cpu: float | None = 0.0
    """Of that, seconds this process's threads waited for a CPU (summed); None where unknown."""

    @classmethod
    def empty(cls, device: str | torch.device = "cpu", *, batch: int = 1, crop: int = 32,
              cbam: str = "nas-lung", head: str = "asoftmax", threads: int | None = None,
              warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS) -> LatencyTable:
        """A table with nothing measured yet, for this machine and these settings."""
        check_timing_settings(warmup, repeats)
        facts = current_facts(device, batch=batch, crop=crop, cbam=cbam, head=head, threads=threads)
        return cls(facts, warmup, repeats)

    @property
    def device(self) -> torch.device:
        return _device(self.facts["device"])

    def missing(self, keys: SearchSpace | Iterable[str]) -> list[str]:
        """The keys (or a space's blocks) not measured yet, sorted."""
        keys = space_blocks(keys) if isinstance(keys, SearchSpace) else keys
        return sorted(set(keys) - self.blocks.keys())

    def covers(self, space: SearchSpace) -> bool:
        return not self.missing(space)

    @property
    def cpu_wait_fraction(self) -> float | None:
        """Seconds waiting for a CPU per second measured: near 0 on a quiet machine."""
        if self.seconds_waiting_for_cpu is None or self.seconds_measuring <= 0:
            return None
        return self.seconds_waiting_for_cpu / self.seconds_measuring

    def here(self) -> dict[str, Any]:
        """This machine's facts for the table's settings (to compare with `facts`)."""
        f = self.facts
        return current_facts(f["device"], batch=f["batch"], crop=f["crop"], cbam=f["cbam"], head=f["head"],
                             threads=f["threads"])

    def measure(self, keys: SearchSpace | Iterable[str], *, progress: bool = True) -> int:
        """Time the blocks of ``keys`` (or of a space) that are not in the table; returns how many.

        Only where the table's facts hold (same device, versions; the thread count is set for
        the timing): a table from another machine is never extended here (ValueError).
        """
        todo = self.missing(keys)
        if not todo:
            return 0
        f = self.facts
        here = self.here()
        if here != {k: f.get(k) for k in FACT_KEYS}:
            raise ValueError(f"this table was measured under other facts ({_diff(f, here)}); "
                             "measure a new one here instead of extending it")
        device = self.device
        chunks = [todo[i:i + INTERLEAVED] for i in range(0, len(todo), INTERLEAVED)]
        with (torch.random.fork_rng(devices=[]), torch_threads(f["threads"]),  # callers' RNG left alone
              _progress(progress) as bar, CpuWait(f"{len(todo)} blocks") as wait):
            task = bar.add_task(f"{len(todo)} block latencies on {f['device_name']} (rounds)",
                                total=len(chunks) * (self.warmup + self.repeats))
            for chunk in chunks:
                fns = []
                for key in chunk:
                    torch.manual_seed(0)
                    module, shape = build_block(key, crop=f["crop"], batch=f["batch"], cbam=f["cbam"],
                                                head=f["head"])
                    fns.append(runnable(module, shape, device))
                medians = median_latencies_ms(fns, device, self.warmup, self.repeats,
                                              lambda: bar.advance(task))
                self.blocks.update(zip(chunk, medians, strict=True))
        self.seconds_measuring += wait.wall
        if wait.waiting is None or self.seconds_waiting_for_cpu is None:
            self.seconds_waiting_for_cpu = None
        else:
            self.seconds_waiting_for_cpu += wait.waiting
        return len(todo)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "facts": self.facts,
            "settings": {"warmup": self.warmup, "repeats": self.repeats, "statistic": "median",
                         "timer": "cuda-events" if self.facts["device"] == "cuda" else "perf_counter",
                         "mode": "eval, torch.inference_mode()"},
            "seconds_measuring": round(self.seconds_measuring, 3),
            "seconds_waiting_for_cpu": (None if self.seconds_waiting_for_cpu is None
                                        else round(self.seconds_waiting_for_cpu, 3)),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "blocks": dict(sorted(self.blocks.items())),
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write the table atomically, by default to its `cache_path`."""
        return write_json(path if path is not None else cache_path(self.facts), self.to_json())

    @classmethod
    def load(cls, path: str | Path, facts: dict[str, Any] | None = None) -> LatencyTable:
        """Read a table; `LatencyCacheError` if it is unreadable or its facts differ from ``facts``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise LatencyCacheError(f"{path}: format {data.get('format')!r}, expected {FORMAT}")
            table = cls(dict(data["facts"]), int(data["settings"]["warmup"]),
                        int(data["settings"]["repeats"]),
                        {str(k): float(v) for k, v in data["blocks"].items()},
                        float(data.get("seconds_measuring", 0.0)), data.get("seconds_waiting_for_cpu"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            if isinstance(error, LatencyCacheError):
                raise
            raise LatencyCacheError(f"{path}: not a latency table ({error})") from error
        if facts is not None and {k: table.facts.get(k) for k in FACT_KEYS} != facts:
            raise LatencyCacheError(f"{path} was measured under other facts: {_diff(table.facts, facts)}")
        return table


def _diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    return ", ".join(f"{k} {have.get(k)!r} here {want.get(k)!r}"
                     for k in FACT_KEYS if have.get(k) != want.get(k)) or "none"


def latency_table(space: SearchSpace, device: str | torch.device = "cpu", *, batch: int = 1,
                  crop: int = 32, cbam: str = "nas-lung", head: str = "asoftmax",
                  threads: int | None = None, warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
                  cache_dir: str | Path | None = None, refresh: bool = False,
                  progress: bool = True) -> LatencyTable:
    """The cached table for this machine and settings, measuring only the blocks it lacks.

    The JSON file is `cache_path` under ``cache_dir``. A cached table keeps the warm-up and
    repeat counts it was first measured with, also for the blocks it is extended with, so all
    its entries are alike; ``refresh=True`` measures everything anew with the given ones. A
    cache whose facts differ from this machine's is never used: it is reported and replaced.
    """
    check_timing_settings(warmup, repeats)
    facts = current_facts(device, batch=batch, crop=crop, cbam=cbam, head=head, threads=threads)
    path = cache_path(facts, cache_dir)
    table = None
    if path.exists() and not refresh:
        try:
            table = LatencyTable.load(path, facts)
        except LatencyCacheError as error:
            from naslung.console import console

            console.print(f"[yellow]ignoring latency cache[/yellow]: {error}")
    if table is None:
        table = LatencyTable(facts, warmup, repeats)
    if table.measure(space, progress=progress):
        table.save(path)
    return table


class _Indices(NamedTuple):
    """Per arch, where each block's latency sits in the dense lookup arrays."""

    channels: np.ndarray  # (C,) every channel count that occurs: the space's widths and the stem's
    valid: np.ndarray  # (N, D) bool: the arch has a block at this position
    stage: np.ndarray  # (N, D) stage of each block position
    cin: np.ndarray  # (N, D) channel index entering each block
    cout: np.ndarray  # (N, D) channel index leaving each block
    stage_in: np.ndarray  # (N, 3) channel index entering each stage (its downsampling conv)
    stage_out: np.ndarray  # (N, 3) channel index leaving each stage (its CBAM)


def _indices(space: SearchSpace) -> _Indices:
    channels = np.array(sorted({*space.widths, STEM_WIDTH}), np.int64)
    to_channel = np.append(np.searchsorted(channels, space.widths), -1)  # code -1 (no block) -> -1
    cout = to_channel[space.codes]
    stem = int(np.searchsorted(channels, STEM_WIDTH))
    cin = np.concatenate([np.full((len(space), 1), stem, np.int64), cout[:, :-1]], axis=1)
    lengths = space.stage_lengths.astype(np.int64)
    ends = np.cumsum(lengths, axis=1)
    position = np.arange(space.max_depth)
    stage = (position >= ends[:, :1]).astype(np.int64) + (position >= ends[:, 1:2])
    valid = position < ends[:, -1:]
    stage_in = np.take_along_axis(cin, ends - lengths, axis=1)
    stage_out = np.take_along_axis(cout, ends - 1, axis=1)
    return _Indices(channels, valid, stage, cin, cout, stage_in, stage_out)


def space_blocks(space: SearchSpace) -> list[str]:
    """Every distinct block key the archs of ``space`` contain, sorted."""
    ix = _indices(space)
    ch = ix.channels
    keys = {"stem"}
    n = len(ch)
    codes = np.unique((ix.stage[ix.valid] * n + ix.cin[ix.valid]) * n + ix.cout[ix.valid])  # 1-D: fast
    keys.update(f"res:s{c // (n * n)}:{ch[c // n % n]}->{ch[c % n]}" for c in codes)
    for s in range(NUM_STAGES):
        keys.update(f"down:s{s}:{ch[c]}" for c in np.unique(ix.stage_in[:, s]))
        keys.update(f"cbam:s{s}:{ch[c]}" for c in np.unique(ix.stage_out[:, s]))
    keys.update(f"head:{ch[c]}" for c in np.unique(ix.stage_out[:, -1]))
    return sorted(keys)


def _lookup(table: LatencyTable, ix: _Indices) -> dict[str, np.ndarray]:
    """Dense float64 arrays of the table's medians by (stage, channel index), NaN where unmeasured."""
    n = len(ix.channels)
    res = np.full((NUM_STAGES, n, n), np.nan)
    down = np.full((NUM_STAGES, n), np.nan)
    cbam = np.full((NUM_STAGES, n), np.nan)
    head = np.full(n, np.nan)
    for s in range(NUM_STAGES):
        for i, a in enumerate(ix.channels):
            down[s, i] = table.blocks.get(f"down:s{s}:{a}", np.nan)
            cbam[s, i] = table.blocks.get(f"cbam:s{s}:{a}", np.nan)
            for j, b in enumerate(ix.channels):
                res[s, i, j] = table.blocks.get(f"res:s{s}:{a}->{b}", np.nan)
    for i, a in enumerate(ix.channels):
        head[i] = table.blocks.get(f"head:{a}", np.nan)
    return {"res": res, "down": down, "cbam": cbam, "head": head}


def _missing_error(missing: list[str]) -> ValueError:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return ValueError(f"the latency table lacks {len(missing)} block(s): {shown}; "
                      "measure them with latency_table(space, ...) or LatencyTable.measure")


def predict(space: SearchSpace, table: LatencyTable) -> np.ndarray:
    """(N,) float64 predicted latency in ms of every arch, in space order: its blocks' medians summed.

    Vectorised over the space's arrays (the full 101,529-arch space in about 50 ms on a 2-core
    CPU); ValueError if the table lacks a block some arch needs.
    """
    if "stem" not in table.blocks:
        raise _missing_error(table.missing(space))
    ix = _indices(space)
    lut = _lookup(table, ix)
    stages = np.arange(NUM_STAGES)
    res = np.where(ix.valid, lut["res"][ix.stage, ix.cin, ix.cout], 0.0).sum(axis=1)
    down = lut["down"][stages, ix.stage_in].sum(axis=1)
    cbam = lut["cbam"][stages, ix.stage_out].sum(axis=1)
    total = res + down + cbam + lut["head"][ix.stage_out[:, -1]] + table.blocks["stem"]
    if np.isnan(total).any():
        raise _missing_error(table.missing(space))
    return total


def predict_arch(arch: Arch | str, table: LatencyTable) -> float:
    """Predicted latency in ms of one arch (the same sum as `predict`, one block at a time)."""
    keys = arch_blocks(arch)
    missing = sorted(set(keys) - table.blocks.keys())
    if missing:
        raise _missing_error(missing)
    return float(sum(table.blocks[key] for key in keys))


def measure_model_latency(arch: Arch | str, device: str | torch.device = "cpu", *, batch: int = 1,
                          crop: int = 32, cbam: str = "nas-lung", head: str = "asoftmax",
                          threads: int | None = None, warmup: int = DEFAULT_WARMUP,
                          repeats: int = DEFAULT_REPEATS) -> float:
    """Warm median latency in ms of a whole `ConvRes` forward pass, timed like the blocks."""
    check_timing_settings(warmup, repeats)
    facts = current_facts(device, batch=batch, crop=crop, cbam=cbam, head=head, threads=threads)
    return _models_ms([arch], facts, warmup, repeats)[0]


def _models_ms(archs: list[Arch | str], facts: dict[str, Any], warmup: int, repeats: int,
               on_round: Callable[[], None] | None = None) -> list[float]:
    """Median latency of whole ConvRes models under ``facts``, timed in interleaved rounds."""
    dev = _device(facts["device"])
    shape = (facts["batch"], 1, facts["crop"], facts["crop"], facts["crop"])
    with torch.random.fork_rng(devices=[]), torch_threads(facts["threads"]):
        fns = []
        for arch in archs:
            torch.manual_seed(0)
            fns.append(runnable(ConvRes(arch, cbam=facts["cbam"], head=facts["head"]), shape, dev))
        return median_latencies_ms(fns, dev, warmup, repeats, on_round)


class Correlation(NamedTuple):
    """Spearman's rho between predicted and measured whole-model latencies of a sample of archs."""

    rho: float
    pvalue: float
    indices: np.ndarray  # arch numbers in the space, in the (random) order they were timed
    predicted: np.ndarray  # ms, from the table
    measured: np.ndarray  # ms, whole models
    cpu_wait_fraction: float | None  # seconds waiting for a CPU per second timing (see `timing.CpuWait`)


def rank_correlation(space: SearchSpace, table: LatencyTable, sample: int = 20, seed: int = 0, *,
                     warmup: int | None = None, repeats: int | None = None,
                     progress: bool = True) -> Correlation:
    """Time whole models of a seeded random sample of archs and rank-correlate them with `predict`.

    Measured on the table's device and settings (ValueError if this machine's facts differ);
    warm-up and repeat counts default to the table's. The models are timed in interleaved
    rounds (see `naslung.search.timing.median_latencies_ms`), up to `INTERLEAVED` at a time, so a
    machine getting busier for a while slows them alike.
    """
    from scipy.stats import spearmanr

    if isinstance(sample, bool) or not isinstance(sample, int) or not 3 <= sample <= len(space):
        raise ValueError(f"sample must be an integer in 3..{len(space)} (the space's size), got {sample!r}")
    f = table.facts
    here = table.here()
    if here != {k: f.get(k) for k in FACT_KEYS}:
        raise ValueError(f"the table was measured under other facts ({_diff(f, here)}): "
                         "its predictions cannot be checked against timings here")
    warmup = table.warmup if warmup is None else warmup
    repeats = table.repeats if repeats is None else repeats
    check_timing_settings(warmup, repeats)
    indices = np.random.default_rng(seed).choice(len(space), size=sample, replace=False)
    predicted = predict(space, table)[indices]
    measured: list[float] = []
    chunks = [indices[i:i + INTERLEAVED] for i in range(0, sample, INTERLEAVED)]
    with _progress(progress) as bar, CpuWait(f"{sample} whole models") as wait:
        task = bar.add_task(f"{sample} whole models on {f['device_name']} (rounds)",
                            total=len(chunks) * (warmup + repeats))
        for chunk in chunks:
            measured += _models_ms([space.arch(int(i)) for i in chunk], f, warmup, repeats,
                                   lambda: bar.advance(task))
    rho, pvalue = spearmanr(predicted, measured)
    return Correlation(float(rho), float(pvalue), indices, predicted, np.array(measured), wait.fraction)


def search_cost(space: SearchSpace, objective: str = "params", *, head: str = "asoftmax", crop: int = 32,
                table: LatencyTable | None = None) -> np.ndarray:
    """(N,) float64 cost of every arch for the search's objective: params, flops or latency (ms).

    ``latency`` needs a table measured for the same head and crop (see `latency_table`).
    """
    if objective == "params":
        return space.params(head).astype(np.float64)
    if objective == "flops":
        return space.flops(crop, head).astype(np.float64)
    if objective != "latency":
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(COST_OBJECTIVES)}")
    if table is None:
        raise ValueError("objective 'latency' needs a LatencyTable (see latency_table)")
    f = table.facts
    if (f["head"], f["crop"]) != (head, crop):
        raise ValueError(f"the latency table is for head {f['head']!r}, crop {f['crop']}; "
                         f"the search uses head {head!r}, crop {crop}")
    return predict(space, table)
