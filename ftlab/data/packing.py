"""Packing: several examples share one sequence of at most ``max_length`` positions.

Why not PaddleNLP's ``ZeroPaddingMapDataset`` directly (its algorithms are the reference):
it builds a dense ``[1, L, L]`` mask per pack when the dataset is built (about 0.26 MB per
pack at L=512, gigabytes for 100k examples), its plain mode skips over-long records without
counting them, and its greedy mode puts each example, in arrival order, into the pack with
the most room (worst fit). Here packs are lists of example indices (the mask is built per
batch by the collator); ``zero_padding`` reproduces PaddleNLP's sequential packs exactly
(a test checks it); ``greedy`` packs a window of examples with best-fit decreasing or,
when that leaves much room, with exact "minimum bin slack" fills (see ``pack_window``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ftlab.data.watchdog import ProgressGuard
from ftlab.errors import DataError

PACKING_MODES = ("none", "zero_padding", "greedy")
GREEDY_WINDOW = 4096  # examples packed together by the greedy strategy


def as_lengths(lengths: Iterable[int]) -> list[int]:
    """Example lengths as Python ints: every packer's entry converts through here once.

    numpy integers break the exact-fill bitset (``reach << np.int64(n)`` does not grow a
    Python int past 64 bits), which once made ``pack_min_slack`` spin forever on a
    mixture's numpy lengths.
    """
    out = [int(n) for n in lengths]
    bad = next((n for n in out if n < 1), None)
    if bad is not None:  # the builders never emit an empty example; a bug guard
        raise DataError(f"cannot pack an example of {bad} tokens (examples have at least one)")
    return out


def pack_sequential(lengths: Sequence[int], capacity: int, start: int = 0) -> Iterator[list[int]]:
    """Packs in order: a pack closes when the next example does not fit (PaddleNLP's)."""
    lengths = as_lengths(lengths)
    pack: list[int] = []
    used = 0
    for i, n in enumerate(lengths, start=start):
        _check_fits(n, capacity)
        if pack and used + n > capacity:
            yield pack
            pack, used = [], 0
        pack.append(i)
        used += n
    if pack:
        yield pack


def pack_best_fit(lengths: Sequence[int], capacity: int, start: int = 0) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest pack it still fits."""
    lengths = as_lengths(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[int] = []  # sorted free space of open packs
    owner: list[int] = []  # pack index for each entry of ``room``
    packs: list[list[int]] = []
    for i in order:
        n = lengths[i]
        _check_fits(n, capacity)
        k = bisect.bisect_left(room, n)
        if k == len(room):
            packs.append([])
            pack, free = len(packs) - 1, capacity
        else:
            pack, free = owner.pop(k), room.pop(k)
        packs[pack].append(i + start)
        free -= n
        if free > 0:
            k = bisect.bisect_left(room, free)
            room.insert(k, free)
            owner.insert(k, pack)
    return packs


def _max_fill(counts: dict[int, int], free: int) -> dict[int, int]:
    """Sizes (with multiplicity) of the fullest subset fitting ``free``; prefers large sizes.

    Bounded subset-sum over the distinct sizes, as a bitset in a Python int (bit t set =
    sum t reachable); copies are added in binary chunks. Backtracking skips a chunk whenever
    the target stays reachable without it, and the small sizes are the ones checked first.
    """
    full = (1 << (free + 1)) - 1
    reach, chunks = 1, []
    for size in sorted(counts, reverse=True):
        left, step = min(counts[size], free // size), 1
        while left > 0:
            take = min(step, left)
            chunks.append((size, take, reach))
            reach = (reach | (reach << (size * take))) & full
            left, step = left - take, step * 2
    target = reach.bit_length() - 1
    used: dict[int, int] = {}
    for size, take, before in reversed(chunks):
        if not (before >> target) & 1:
            used[size] = used.get(size, 0) + take
            target -= size * take
    return used


def pack_min_slack(lengths: Sequence[int], capacity: int, start: int = 0) -> list[list[int]]:
    """Minimum bin slack: each pack takes the fullest subset of what is left (exact fill).

    Slower than best fit, but on examples of similar length (4-5 per pack) best fit
    strands a gap in every pack that no remaining example fits; exact fills avoid that.
    Every round must take at least one example (a guard turns a bug into an error).
    """
    lengths = as_lengths(lengths)
    guard = ProgressGuard("greedy packing (pack_min_slack)")
    by_size: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        _check_fits(n, capacity)
        by_size.setdefault(n, []).append(i + start)
    counts = {size: len(ids) for size, ids in by_size.items()}
    packs: list[list[int]] = []
    while counts:
        pack: list[int] = []
        for size, take in _max_fill(counts, capacity).items():
            pack += [by_size[size].pop() for _ in range(take)]
            counts[size] -= take
            if not counts[size]:
                del counts[size]
        guard.round(bool(pack), f"{sum(counts.values())} examples left, capacity {capacity}")
        packs.append(pack)
    return packs


def pack_window(lengths: Sequence[int], capacity: int, start: int = 0) -> list[list[int]]:
    """The better of best-fit decreasing and minimum bin slack (tried only if BFD is >2% off
    the lower bound ``ceil(tokens / capacity)``)."""
    lengths = as_lengths(lengths)
    packs = pack_best_fit(lengths, capacity, start)
    bound = -(-sum(lengths) // capacity)
    if len(packs) <= bound * 1.02:
        return packs
    exact = pack_min_slack(lengths, capacity, start)
    return exact if len(exact) < len(packs) else packs


def pack_greedy(
    lengths: Sequence[int], capacity: int, window: int = GREEDY_WINDOW
) -> Iterator[list[int]]:
    """Packs over consecutive windows of ``window`` examples (``pack_window`` each)."""
    lengths = as_lengths(lengths)
    for start in range(0, len(lengths), window):
        yield from pack_window(lengths[start : start + window], capacity, start)


def pack_order(n: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order ``n`` examples are packed in: seeded-shuffled when ``data.shuffle`` (so a
    pack mixes examples from all over the file), else the file's order."""
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def make_packs(mode: str, lengths: Sequence[int], capacity: int) -> list[list[int]]:
    lengths = as_lengths(lengths)
    if mode == "zero_padding":
        return list(pack_sequential(lengths, capacity))
    if mode == "greedy":
        return list(pack_greedy(lengths, capacity))
    raise DataError(f"data.packing={mode!r} is not one of {', '.join(PACKING_MODES)}.")


def _check_fits(n: int, capacity: int) -> None:
    if n > capacity:  # examples are cut to max_length before packing; this is a bug guard
        raise DataError(
            f"an example of {n} tokens exceeds the pack size {capacity}; "
            "examples must be truncated to data.max_length before packing"
        )


def concat_pack(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """One packed item: concatenated ids and labels plus each example's length."""
    parts = list(parts)
    return {
        "input_ids": np.concatenate([p[0] for p in parts]),
        "labels": np.concatenate([p[1] for p in parts]),
        "seq_lens": np.asarray([len(p[0]) for p in parts], dtype=np.int32),
    }
