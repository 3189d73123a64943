"""Packing windows of visible tokens into equal-size groups (GreenMIM's "optimal grouping"):
histogram best-fit decreasing, the Martello-Toth bound L2, an exact search for small instances, and
a certificate of optimality. The problem and the solver: docs/methods/greenmim_grouping.md.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["GroupPlan", "group_cost", "bin_lower_bound", "count_bins_bfd", "pack_bfd", "pack_exact",
           "plan_groups"]

BinTypes = tuple[tuple[int, tuple[int, ...]], ...]   # ((count, sizes in decreasing order), ...)


def group_cost(num_groups: int, group_size: int, slot_cost: float = 0.0) -> float:
    """Attention cost of ``num_groups`` groups of ``group_size`` slots (see the module docstring)."""
    return float(num_groups) * group_size * (group_size + slot_cost)


def _as_hist(hist: Sequence[int]) -> np.ndarray:
    h = np.asarray(hist, dtype=np.int64).reshape(-1).copy()
    if h.size == 0 or (h < 0).any():
        raise ValueError("hist must be a non-empty histogram of non-negative counts")
    h[0] = 0  # empty windows take no place
    nz = np.flatnonzero(h)
    return h[: nz[-1] + 1] if nz.size else h[:1]


def bin_lower_bound(hist: Sequence[int], capacity: int) -> int:
    """Martello-Toth bound L2 on the number of bins of size ``capacity`` (vectorised over its parameter)."""
    h = _as_hist(hist)
    if h.size - 1 > capacity:
        raise ValueError(f"a window of {h.size - 1} tokens does not fit a group of {capacity}")
    c = capacity
    full = np.zeros(c + 1, dtype=np.int64)
    full[: h.size] = h
    sizes = np.arange(c + 1, dtype=np.int64)
    cnt = np.cumsum(full)                  # items with size <= s
    tot = np.cumsum(full * sizes)          # their total size
    half = c // 2
    k = np.arange(0, half + 1)
    big_lim = c - k                        # J1: size > c - k; J2: c/2 < size <= c - k
    n_j1 = cnt[c] - cnt[big_lim]
    n_j2 = cnt[big_lim] - cnt[half]
    s_j2 = tot[big_lim] - tot[half]
    below_k = np.where(k > 0, tot[np.maximum(k - 1, 0)], 0)
    s_j3 = tot[half] - below_k             # J3: k <= size <= c/2
    spill = s_j3 - (n_j2 * c - s_j2)
    extra = np.where(spill > 0, -(-spill // c), 0)
    l2 = int((n_j1 + n_j2 + extra).max())
    return max(l2, int(-(-tot[c] // c)))


def _bfd(h: np.ndarray, capacity: int, track: bool):
    """Best-fit decreasing on a size histogram.

    Items are taken largest first; each goes to the open bin with the smallest residual that
    fits it (a new bin when none does). Bins with equal residual are interchangeable, so
    the state is a count per residual level; with ``track`` it is a count per (residual,
    contents). Returns the number of bins, or the bin types ((count, sizes), ...).
    """
    levels: list[int] = []                           # sorted residuals with open bins
    bins: dict[int, object] = {}                     # residual -> count | {contents: count}

    def add(res: int, contents: tuple[int, ...], n: int) -> None:
        if res not in bins:
            bisect.insort(levels, res)
            bins[res] = {} if track else 0
        if track:
            d = bins[res]
            d[contents] = d.get(contents, 0) + n
        else:
            bins[res] += n

    def drop(res: int) -> None:
        del bins[res]
        levels.remove(res)

    for s in range(h.size - 1, 0, -1):
        c = int(h[s])
        while c > 0:
            i = bisect.bisect_left(levels, s)
            if i == len(levels):                     # nothing fits: open bins, each filled with q items
                q = capacity // s
                full, rest = divmod(c, q)
                if full:
                    add(capacity - q * s, (s,) * q, full)
                if rest:
                    add(capacity - rest * s, (s,) * rest, 1)
                break
            r = levels[i]
            q = r // s                               # a bin at level r takes q items before it stops fitting
            if not track:
                nb = bins[r]
                full = min(nb, c // q)
                c -= full * q
                left = nb - full
                drop(r)
                if full:
                    add(r - q * s, (), full)
                if c and left:                       # c < q: one more bin takes the rest
                    add(r - c * s, (), 1)
                    left -= 1
                    c = 0
                if left:
                    add(r, (), left)
                continue
            types = bins[r]
            drop(r)
            for contents in sorted(types, reverse=True):
                n = types[contents]
                if c >= q:
                    take = min(n, c // q)
                    add(r - q * s, contents + (s,) * q, take)
                    c -= take * q
                    n -= take
                if n and 0 < c < q:
                    add(r - c * s, contents + (s,) * c, 1)
                    n -= 1
                    c = 0
                if n:
                    add(r, contents, n)
    if not track:
        return sum(bins.values())
    out = []
    for r in levels:
        for contents, n in bins[r].items():
            out.append((n, contents))
    out.sort(key=lambda t: (t[1], t[0]), reverse=True)
    return tuple(out)


def count_bins_bfd(hist: Sequence[int], capacity: int) -> int:
    """Number of bins best-fit decreasing uses."""
    h = _as_hist(hist)
    if h.size - 1 > capacity:
        raise ValueError(f"a window of {h.size - 1} tokens does not fit a group of {capacity}")
    return int(_bfd(h, capacity, track=False))


def pack_bfd(hist: Sequence[int], capacity: int) -> BinTypes:
    """Best-fit decreasing packing as bin types: ((count, window sizes of one such bin), ...)."""
    h = _as_hist(hist)
    if h.size - 1 > capacity:
        raise ValueError(f"a window of {h.size - 1} tokens does not fit a group of {capacity}")
    return _bfd(h, capacity, track=True)


def _items(h: np.ndarray) -> list[int]:
    return [s for s in range(h.size - 1, 0, -1) for _ in range(int(h[s]))]


def _as_types(bins: list[list[int]]) -> BinTypes:
    counts: dict[tuple[int, ...], int] = {}
    for b in bins:
        key = tuple(sorted(b, reverse=True))
        counts[key] = counts.get(key, 0) + 1
    return tuple(sorted(((n, k) for k, n in counts.items()), key=lambda t: (t[1], t[0]), reverse=True))


def pack_exact(hist: Sequence[int], capacity: int, upper: Optional[int] = None,
               node_limit: int = 200_000) -> tuple[Optional[BinTypes], bool]:
    """Branch and bound for the fewest bins. Returns (bin types or None, proven).

    ``upper``: a known number of bins (only packings with fewer are searched; None when
    none is found). ``proven`` is False when the search stopped at ``node_limit``.
    """
    h = _as_hist(hist)
    items = _items(h)
    cap = capacity
    if items and items[0] > cap:
        raise ValueError(f"a window of {items[0]} tokens does not fit a group of {cap}")
    lower = bin_lower_bound(h, cap)
    best_n = upper if upper is not None else len(items) + 1
    best: list[Optional[list[list[int]]]] = [None]
    suffix = np.concatenate([np.cumsum(items[::-1])[::-1], [0]]).tolist() if items else [0]
    res: list[int] = []
    content: list[list[int]] = []
    nodes = [0]

    def dfs(i: int) -> bool:                          # True: stop (bound reached or node limit)
        nonlocal best_n
        nodes[0] += 1
        if nodes[0] > node_limit:
            return True
        if i == len(items):
            if len(res) < best_n:
                best_n = len(res)
                best[0] = [list(b) for b in content]
            return best_n <= lower
        free = sum(res)
        if len(res) + max(0, -(-(suffix[i] - free) // cap)) >= best_n:
            return False
        s = items[i]
        tried = set()
        for b in range(len(res)):
            r = res[b]
            if r >= s and r not in tried:
                tried.add(r)
                res[b] -= s
                content[b].append(s)
                stop = dfs(i + 1)
                content[b].pop()
                res[b] += s
                if stop:
                    return True
                if r == s:                            # an exact fit is never worse than the alternatives
                    return False
        if len(res) + 1 < best_n:
            res.append(cap - s)
            content.append([s])
            stop = dfs(i + 1)
            res.pop()
            content.pop()
            if stop:
                return True
        return False

    stopped = dfs(0) if items else False
    proven = not (stopped and nodes[0] > node_limit)
    if best[0] is None:
        return (None if items else ()), proven
    return _as_types(best[0]), proven


@dataclass(frozen=True)
class GroupPlan:
    """How to pack the windows of one (stage, shift).

    group_size: g (slots per group); num_groups: G; bins: ((count, window sizes), ...) with
    ``sum(count) == G``; cost: ``group_cost(G, g, slot_cost)``; bound: a lower bound on the
    cost of any grouping (so ``cost / bound - 1`` bounds the distance to the optimum);
    certified: proven optimal under the cost model; candidates: group sizes evaluated;
    tokens: visible tokens; windows: non-empty windows.
    """

    group_size: int
    num_groups: int
    bins: BinTypes
    cost: float
    bound: float
    certified: bool
    candidates: int
    tokens: int
    windows: int

    @property
    def padding(self) -> float:
        """Fraction of slots that are padding."""
        return 1.0 - self.tokens / (self.num_groups * self.group_size)

    def members(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One row per window slot of the plan, ordered by window size (decreasing, stable):
        (size, group index, first slot inside the group), each (windows,) int64."""
        sizes, offs, base, reps = [], [], [], []
        g0 = 0
        for n, contents in self.bins:
            off = 0
            for s in contents:
                sizes.append(s)
                offs.append(off)
                base.append(g0)
                reps.append(n)
                off += s
            g0 += n
        reps_a = np.asarray(reps, dtype=np.int64)
        row = np.repeat(np.arange(len(reps), dtype=np.int64), reps_a)
        start = np.repeat(np.cumsum(reps_a) - reps_a, reps_a)
        copy = np.arange(row.size, dtype=np.int64) - start
        size = np.asarray(sizes, dtype=np.int64)[row]
        group = np.asarray(base, dtype=np.int64)[row] + copy
        offset = np.asarray(offs, dtype=np.int64)[row]
        order = np.argsort(-size, kind="stable")
        return size[order], group[order], offset[order]


def plan_groups(hist: Sequence[int], slot_cost: float = 0.0, exact_items: int = 12,
                node_limit: int = 2_000, max_group_size: Optional[int] = None) -> GroupPlan:
    """A group size and packing for windows with this size histogram: the least ``group_cost`` when
    the returned plan is ``certified``; otherwise (more than ``exact_items`` windows and BFD above
    the lower bound for some competitive g) the best BFD packing found, a heuristic.

    hist: ``hist[s]`` = number of windows holding ``s`` visible tokens (``hist[0]`` ignored).
    exact_items: run the exact search when BFD misses the lower bound and there are at most
    this many windows. max_group_size: optional cap on g (e.g. a kernel limit).
    """
    h = _as_hist(hist)
    sizes = np.arange(h.size)
    total = int((h * sizes).sum())
    n_items = int(h.sum())
    if n_items == 0:
        raise ValueError("no visible tokens to group")
    g = h.size - 1
    g_max = total if max_group_size is None else min(total, max_group_size)
    if g > g_max:
        raise ValueError(f"a window of {g} tokens exceeds max_group_size {max_group_size}")
    best: Optional[tuple[float, int, int, Optional[BinTypes]]] = None    # cost, g, G, exact bins
    seen: list[tuple[float, bool]] = []                                  # (lower-bound cost, exact) per g
    while g <= g_max:
        if best is not None and total * (g + slot_cost) >= best[0]:
            break                                                        # G * g >= total for any packing
        lb = bin_lower_bound(h, g)
        lb_cost = group_cost(lb, g, slot_cost)
        if best is not None and lb_cost >= best[0]:
            seen.append((lb_cost, True))
            g += 1
            continue
        nb = count_bins_bfd(h, g)
        exact, bins = nb == lb, None
        if not exact and n_items <= exact_items:
            found, proven = pack_exact(h, g, upper=nb, node_limit=node_limit)
            if found is not None:
                bins, nb = found, sum(n for n, _ in found)
            exact = proven
        cost = group_cost(nb, g, slot_cost)
        if best is None or cost < best[0]:
            best = (cost, g, nb, bins)
        seen.append((lb_cost, exact))
        g += 1
    assert best is not None
    cost, g, nb, bins = best
    certified = all(exact or lb_cost >= cost for lb_cost, exact in seen)
    bound = min([cost] + [lb_cost for lb_cost, _ in seen])
    if bins is None:
        bins = pack_bfd(h, g)
    assert sum(n for n, _ in bins) == nb
    return GroupPlan(group_size=g, num_groups=nb, bins=bins, cost=cost, bound=bound, certified=certified,
                     candidates=len(seen), tokens=total, windows=n_items)
