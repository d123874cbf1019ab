"""`SearchSpace`: every architecture NAS-Lung may try, as arrays, with vectorised costs and order.

POP touches the whole space on every evaluation (pruning compares one trained arch with all
others), so the space is held as integer arrays rather than 100k `Arch` objects, and its
costs and partial order are computed for all archs at once.
"""

from __future__ import annotations

from functools import cached_property
from itertools import combinations, combinations_with_replacement

import numpy as np

from naslung.arch import MIN_WIDTH, NUM_STAGES, STEM_WIDTH, Arch


class SearchSpace:
    """All archs with widths from `widths`, flattened width sequence non-decreasing, total depth
    in [min_depth, max_depth], split into 3 non-empty stages.

    Archs are numbered in a fixed order (by depth, then widths, then split), so an index names
    the same arch in every process and in a journal.
    """

    def __init__(self, widths: tuple[int, ...] = (4, 8, 16, 32, 64, 128), min_depth: int = 3,
                 max_depth: int = 9) -> None:
        widths = tuple(int(w) for w in widths)
        if not widths or any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError(f"widths must be a non-empty, strictly increasing sequence, got {widths}")
        if widths[0] < MIN_WIDTH or len(widths) > 127:  # codes are int8
            raise ValueError(f"widths must be >= {MIN_WIDTH} and at most 127 of them, got {widths}")
        if not NUM_STAGES <= min_depth <= max_depth <= 127:
            raise ValueError(f"need {NUM_STAGES} <= min_depth <= max_depth <= 127 (one block per stage "
                             f"at least), got min_depth={min_depth}, max_depth={max_depth}")
        self.widths = widths
        self.min_depth = min_depth
        self.max_depth = max_depth
        codes, lengths = [], []
        for depth in range(min_depth, max_depth + 1):
            seqs = np.array(list(combinations_with_replacement(range(len(widths)), depth)), np.int8)
            cuts = np.array(list(combinations(range(1, depth), NUM_STAGES - 1)))
            split = np.diff(cuts, prepend=0, append=depth, axis=1).astype(np.int8)
            padded = np.full((len(seqs), max_depth), -1, np.int8)
            padded[:, :depth] = seqs
            codes.append(np.repeat(padded, len(split), axis=0))
            lengths.append(np.tile(split, (len(seqs), 1)))
        self.codes: np.ndarray = np.concatenate(codes)
        """(N, max_depth) int8: index into `widths` per block, -1 after the last block."""
        self.stage_lengths: np.ndarray = np.concatenate(lengths)
        """(N, 3) int8: blocks per stage."""
        self._ends = np.cumsum(self.stage_lengths, axis=1, dtype=np.int64)  # one past each stage
        self._aligned = self._right_aligned_stages()

    def _right_aligned_stages(self) -> np.ndarray:
        """(3 x longest stage, N) int8 codes per stage, right-aligned, -1 to the left.

        In `below`, a -1 of j fits under any block of i and only a -1 fits under a -1 of i, so
        comparing these rows elementwise also checks that no stage of j is longer than i's.
        """
        longest = self.max_depth - (NUM_STAGES - 1)
        offset = np.arange(longest) - longest  # position from the stage's end, -longest..-1
        source = self._ends[:, :, None] + offset  # (N, 3, longest) block index in the codes
        inside = offset >= -self.stage_lengths[:, :, None].astype(np.int64)
        rows = np.arange(len(self))[:, None, None]
        aligned = np.where(inside, self.codes[rows, np.where(inside, source, 0)], -1).astype(np.int8)
        return np.ascontiguousarray(aligned.reshape(len(self), -1).T)

    def __len__(self) -> int:
        return len(self.codes)

    def __repr__(self) -> str:
        return (f"SearchSpace(widths={self.widths}, depth={self.min_depth}..{self.max_depth}: "
                f"{len(self)} archs)")

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise ValueError(f"arch index {i} is outside this space of {len(self)} archs")
        return int(i)

    def arch(self, i: int) -> Arch:
        """The `Arch` numbered ``i``."""
        i = self._check(i)
        flat = [self.widths[c] for c in self.codes[i] if c >= 0]
        ends = self._ends[i]
        return Arch(tuple(tuple(flat[a:b]) for a, b in zip((0, *ends[:-1]), ends, strict=True)))

    def index(self, arch: Arch | str) -> int:
        """The number of ``arch`` (an `Arch` or its text); ValueError if it is not in the space."""
        arch = Arch.parse(arch) if isinstance(arch, str) else arch
        flat = arch.widths
        if not self.min_depth <= len(flat) <= self.max_depth:
            raise ValueError(f"arch {arch} has depth {len(flat)}, outside this space's "
                             f"{self.min_depth}..{self.max_depth}")
        if any(w not in self.widths for w in flat):
            raise ValueError(f"arch {arch} uses widths outside this space's {self.widths}")
        if any(a > b for a, b in zip(flat, flat[1:], strict=False)):
            raise ValueError(f"arch {arch} is not in the space: its widths must never decrease")
        codes = np.full((1, self.max_depth), -1, np.int8)
        codes[0, : len(flat)] = [self.widths.index(w) for w in flat]
        lengths = np.array([[len(stage) for stage in arch.stages]], np.int8)
        return self._index_of[self._key(codes, lengths)[0]]

    @staticmethod
    def _key(codes: np.ndarray, lengths: np.ndarray) -> list[bytes]:
        return list(map(bytes, np.concatenate([codes, lengths], axis=1)))

    @cached_property
    def _index_of(self) -> dict[bytes, int]:
        """Arch number by its codes and stage lengths; built on the first `index` call."""
        return dict(zip(self._key(self.codes, self.stage_lengths), range(len(self)), strict=True))

    def _costs(self, crop: int, head: str) -> tuple[np.ndarray, np.ndarray]:
        """(params, flops) of every arch; the same layer sums as `Arch.layers`, done on arrays."""
        stem = [layer for layer in Arch.parse("4/4/4").layers(crop, head) if layer.name.startswith("stem")]
        width = np.append(np.asarray(self.widths, np.int64), 0)[self.codes]  # 0 after the last block
        cin = np.concatenate([np.full((len(self), 1), STEM_WIDTH, np.int64), width[:, :-1]], axis=1)
        sizes = [crop]
        for _ in range(NUM_STAGES):
            sizes.append((sizes[-1] - 1) // 2 + 1)  # stride-2, k3, p1 downsampling
        volume = np.array(sizes[1:], np.int64) ** 3
        block = np.arange(self.max_depth)
        stage_of_block = (block >= self._ends[:, :1]).astype(np.int64) + (block >= self._ends[:, 1:2])
        products = 28 * cin * width + 27 * width**2  # conv1 (k3: 27) + shortcut (k1: 1), conv2; per voxel
        params = (products + 9 * width).sum(1)  # + biases and BN gamma/beta of the three convs
        flops = (2 * volume[stage_of_block] * products).sum(1)
        c_in = np.take_along_axis(cin, self._ends - self.stage_lengths, axis=1)  # entering each stage
        c_out = np.take_along_axis(width, self._ends - 1, axis=1)  # leaving each stage, into CBAM
        params += (27 * c_in**2 + 2 * c_in).sum(1) + (2 * c_out * (c_out // 4) + 54).sum(1)
        flops += (2 * volume * 27 * c_in**2).sum(1) + (2 * (4 * c_out * (c_out // 4) + 54 * volume)).sum(1)
        last = c_out[:, -1]
        params += 2 * last + (2 if head == "linear" else 0) + sum(layer.params for layer in stem)
        flops += 4 * last + sum(layer.flops for layer in stem)
        return params, flops

    def params(self, head: str = "asoftmax") -> np.ndarray:
        """(N,) int64 trainable parameters, equal to `Arch.params` for every arch."""
        return self._costs(32, head)[0]

    def flops(self, crop: int = 32, head: str = "asoftmax") -> np.ndarray:
        """(N,) int64 FLOPs of one forward pass, equal to `Arch.flops` for every arch."""
        return self._costs(crop, head)[1]

    def below(self, i: int) -> np.ndarray:
        """(N,) bool: the archs j <= arch i in POP's partial order (i itself included).

        j <= i when j can be made from i by narrowing and deleting blocks: stage by stage, j's
        widths match a subsequence of i's, each <= the width it matches. As widths never
        decrease, a match exists iff the right-aligned one does (j's last block against i's
        last, and so on): any match puts j's t-th block from the end at or before i's t-th
        from the end, whose width is no smaller. So one elementwise comparison decides it.
        """
        mine = self._aligned[:, self._check(i)]
        result = self._aligned[0] <= mine[0]
        fits = np.empty_like(result)
        for row, code in zip(self._aligned[1:], mine[1:], strict=True):  # row by row: contiguous, fast
            result &= np.less_equal(row, code, out=fits)
        return result
