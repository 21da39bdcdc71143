"""Exact dynamic thresholding (Imagen) without torch.quantile: no size limit, optionally across processes.

diffusers' `_threshold_sample` computes, per sample, s = clamp(torch.quantile(|x0|, ratio), 1, sample_max_value)
and returns clamp(x0, -s, s) / s. torch.quantile sorts every row and refuses rows of more than 2**24 elements.
This module finds the same s bit for bit, for rows of any length, from two order statistics:

- torch.quantile interpolates ("linear") between the order statistics floor(rank) and ceil(rank) of the row,
  rank = ratio * (n - 1) computed in the row's dtype (n - 1 rounded to it first), with weight rank - floor(rank)
  and torch.lerp; a row holding a NaN gives NaN (`quantile_indices`, `threshold_from_order_statistics`);
- only order statistics inside the window [1, sample_max_value) need their exact values: below it s is 1,
  above it (finite) s is sample_max_value, and an infinite one makes s inf or NaN whatever the other is. So
  counts of |x0| below 1, below sample_max_value, finite and not NaN decide which exact values are needed;
- the exact values: locally, from the integer bit patterns of |x0| (non-negative floats sort like their bit
  patterns; NaN patterns sort last): a histogram of their top bits places both order statistics, then only the
  elements of their bins are searched, O(n) instead of torch.quantile's sort; across the shards of a sample held by
  several processes, a radix select: the per-sample counts, the extremes next to the window and histograms of
  the window's bit patterns, RADIX_BITS at a time, all-reduced with `torch.distributed`, so every process finds
  the threshold one process holding the whole sample would (the algorithm of kernels/threshold.py).
"""

from __future__ import annotations

import functools

import torch

RADIX_BITS = 10
NUM_BINS = 1 << RADIX_BITS
# Bit patterns of |x| for float32 and float64: the largest non-negative integer (the mask clearing the sign), +inf
# and a quiet NaN.
_PATTERNS = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, 0x7FF8000000000000),
}


def window_bits(max_value: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """(bit pattern of 1.0, bit pattern of sample_max_value, the clamp bound) in `dtype` (float32 or float64).
    The bound is sample_max_value rounded to the dtype, as torch.clamp rounds it; past float32's range it is
    +inf (no float32 reaches the true bound; torch.clamp itself would raise)."""
    bound = torch.tensor(float(max_value), dtype=torch.float64).to(dtype)
    int_dtype = _PATTERNS[dtype][0]
    one = int(torch.tensor(1.0, dtype=dtype).view(int_dtype))
    return one, max(int(bound.view(int_dtype)), one), float(bound)


def radix_levels(window_lo: int, window_hi: int, radix_bits: int = RADIX_BITS) -> int:
    """How many `radix_bits`-bit digits an offset into the window's bit patterns [window_lo, window_hi) has."""
    span = window_hi - window_lo
    return -(-(span - 1).bit_length() // radix_bits) if span > 1 else 0


def abs_bits(flat: torch.Tensor) -> torch.Tensor:
    """The bit patterns of |flat| as integers (the sign bit cleared; NaN stays above +inf)."""
    int_dtype, mask, _, _ = _PATTERNS[flat.dtype]
    return flat.view(int_dtype) & mask


def quantile_indices(n, ratio: float, dtype: torch.dtype, device=None):
    """(below, above, weight) of torch.quantile(row, ratio) for rows of `n` elements (an int or an int64 tensor):
    the order statistics it interpolates and the weight, computed as torch computes them. For n - 1 past 2**24
    in float32 the rank is rounded as torch rounds it and the indices are kept within the row."""
    if not isinstance(n, torch.Tensor):
        n = torch.tensor(n, dtype=torch.int64, device=device)
    # torch.quantile's q * last_index: n - 1 rounded to the dtype, times q (a scalar holding the dtype's value
    # of ratio, so a device `n` needs no host-to-device copy), rounded once.
    rank = (n - 1).to(dtype) * torch.tensor(ratio, dtype=dtype).item()
    floor = rank.to(torch.int64)
    below = torch.minimum(floor, n - 1)
    above = torch.minimum(rank.ceil().to(torch.int64), n - 1)
    return below, above, rank - floor


def threshold_from_order_statistics(below: torch.Tensor, above: torch.Tensor, weight: torch.Tensor,
                                    bound: float) -> torch.Tensor:
    """s = clamp(lerp(below, above, weight), 1, bound) on (batch,) tensors, by the ops torch.quantile and
    diffusers use, on (batch, 1) tensors as torch.quantile calls torch.lerp (whose CPU kernels fuse the
    multiply-add: any other rounding would differ in the last bit)."""
    batch = below.shape[0]
    weight = weight.expand(batch).reshape(batch, 1)
    q = torch.lerp(below.reshape(batch, 1), above.reshape(batch, 1), weight)
    q = q.clamp_(min=1, max=bound) if bound != float("inf") else q.clamp_(min=1)
    return q.view(batch)


def _locate(index, n_low, n_window, n_high, n_inf, low_bits, high_bits, inf_bits, nan_bits):
    """Where order statistic `index` lies: (its bit pattern or its stand-in, rank in the window or -1)."""
    window_start, high_start = n_low, n_low + n_window
    inf_start = high_start + n_high
    nan_start = inf_start + n_inf
    bits = torch.where(index < window_start, low_bits,
                       torch.where(index < high_start, torch.zeros_like(low_bits),
                                   torch.where(index < inf_start, high_bits,
                                               torch.where(index < nan_start, inf_bits, nan_bits))))
    rank = torch.where((index >= window_start) & (index < high_start), index - window_start, -1)
    return bits, rank


# The local path histograms |x0| by its top bits first: sign (0), exponent and the leading mantissa bits.
TOP_SHIFT = {torch.float32: 16, torch.float64: 48}
TOP_BINS = 1 << 15
# A histogram bin holding more candidates than this is searched with torch.kthvalue rather than sorted.
SORT_LIMIT = 1 << 14


def _row_select(row: torch.Tensor, top: torch.Tensor, cumulative: torch.Tensor, below: int, above: int):
    """Order statistics `below` and `above` (0-based, above - below <= 1) of one row of bit patterns, from the
    cumulative histogram of its top bits: only the elements of the bins holding them are searched."""
    bin_below = int(torch.searchsorted(cumulative, below, right=True))
    start = int(cumulative[bin_below - 1]) if bin_below else 0
    candidates = row[top == bin_below]
    sortable = candidates.numel() <= SORT_LIMIT
    if sortable:
        candidates = torch.sort(candidates).values

    def pick(index):
        if sortable:
            return candidates[index]
        return torch.kthvalue(candidates, index + 1).values

    lower = pick(below - start)
    if above == below:
        return lower, lower
    if above - start < candidates.numel():
        return lower, pick(above - start)
    # The upper statistic opens the next non-empty bin: its smallest element.
    bin_above = int(torch.searchsorted(cumulative, above, right=True))
    return lower, row[top == bin_above].min()


def _count_below(row: torch.Tensor, top: torch.Tensor, cumulative: torch.Tensor, bound: int, shift: int):
    """How many elements of the row are below the bit pattern `bound`: read from the cumulative histogram when
    the bound starts a bin, else that plus a count inside the bound's bin."""
    bin = bound >> shift
    count = int(cumulative[bin - 1]) if bin else 0
    if bound & ((1 << shift) - 1) and bin < cumulative.numel():
        inside = int(cumulative[bin]) - count
        if inside:
            count += int((row[top == bin] < bound).sum())
    return count


def _local_order_statistics(bits: torch.Tensor, ratio: float, dtype: torch.dtype, lo: int, hi: int):
    """(lower, upper) order statistics of each row as bit patterns (stand-ins where the exact value cannot
    change s), and the weight. Per row: one histogram of the top bits gives the counts that place the two
    order statistics; only if the threshold depends on their exact values are the elements of their bins
    searched (sorted, or torch.kthvalue when a bin holds many). Exact for any row length."""
    _, _, inf_bits, nan_bits = _PATTERNS[dtype]
    shift = TOP_SHIFT[dtype]
    batch, n = bits.shape
    below, above, weight = quantile_indices(n, ratio, dtype, bits.device)
    below, above = int(below), int(above)
    tops = bits >> shift
    lower, upper = [], []
    for row, top in zip(bits, tops):
        cumulative = torch.bincount(top, minlength=TOP_BINS).cumsum(0)
        n_low = _count_below(row, top, cumulative, lo, shift)
        n_under_hi = _count_below(row, top, cumulative, hi, shift)
        n_finite = _count_below(row, top, cumulative, inf_bits, shift)
        n_numbers = _count_below(row, top, cumulative, inf_bits + 1, shift)

        def stand_in(index):
            # A value in the same range as the true order statistic: s does not depend on which.
            if index < n_low:
                return 0
            if index < n_under_hi:
                return lo
            if index < n_finite:
                return hi
            return inf_bits if index < n_numbers else nan_bits

        if n_numbers < n:  # a NaN in the row: torch.quantile's answer is NaN
            pair = (nan_bits, nan_bits)
        elif above < n_finite and below < n_under_hi and above >= n_low:
            # The interpolation can land in [1, bound] or on its edges: the exact values decide.
            pair = tuple(int(v) for v in _row_select(row, top, cumulative, below, above))
        else:
            pair = (stand_in(below), stand_in(above))
        lower.append(pair[0])
        upper.append(pair[1])
    as_tensor = functools.partial(torch.tensor, dtype=bits.dtype, device=bits.device)
    return as_tensor(lower), as_tensor(upper), weight


def all_reduce_hook(process_group):
    """`reduce(tensor, op)`: all-reduce `tensor` in place over `process_group` with op "sum" or "max"."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def reduce(tensor: torch.Tensor, op: str) -> None:
        dist.all_reduce(tensor, op=ops[op], group=process_group)

    return reduce


def _radix_order_statistics(bits: torch.Tensor, ratio: float, dtype: torch.dtype, lo: int, hi: int, reduce=None):
    """As `_local_order_statistics`, by radix select over the window's bit patterns, every count and histogram
    passed through `reduce` (all-reduce over the processes holding shards of the same samples; None: this
    process holds the whole samples)."""
    _, max_bits, inf_bits, nan_bits = _PATTERNS[dtype]
    batch, width = bits.shape
    device = bits.device
    reduce = reduce or (lambda tensor, op: None)
    is_low = bits < lo
    under_hi = bits < hi
    finite = bits < inf_bits
    n_low, n_under_hi, n_finite = is_low.sum(1), under_hi.sum(1), finite.sum(1)
    n_numbers = (bits <= inf_bits).sum(1)
    counts = torch.stack([n_low, n_under_hi - n_low, n_finite - n_under_hi, n_numbers - n_finite,
                          width - n_numbers], dim=1)
    reduce(counts, "sum")
    # Both extremes as maxima of non-negative integers (0: none), so one all-reduce op serves both.
    extremes = torch.zeros(batch, 2, dtype=torch.int64, device=device)
    if width:
        extremes[:, 0] = torch.where(is_low, bits, -1).amax(1).to(torch.int64) + 1
        high = ~under_hi & finite
        extremes[:, 1] = max_bits - torch.where(high, bits, max_bits).amin(1).to(torch.int64)
    reduce(extremes, "max")
    n_low, n_window, n_high, n_inf, n_nan = counts.unbind(1)
    below, above, weight = quantile_indices(counts.sum(1), ratio, dtype, device)
    low_bits, high_bits = extremes[:, 0] - 1, max_bits - extremes[:, 1]
    inf_t = torch.tensor(inf_bits, device=device)
    nan_t = torch.tensor(nan_bits, device=device)
    lower, rank_lower = _locate(below, n_low, n_window, n_high, n_inf, low_bits, high_bits, inf_t, nan_t)
    upper, rank_upper = _locate(above, n_low, n_window, n_high, n_inf, low_bits, high_bits, inf_t, nan_t)
    ranks = torch.stack([rank_lower, rank_upper])  # (2, batch)
    wanted = ranks >= 0
    prefixes = torch.zeros_like(ranks)

    levels = radix_levels(lo, hi)
    top = levels * RADIX_BITS
    # Each row's window elements, as offsets from the window's first bit pattern.
    in_window = ~is_low & under_hi
    offsets = [bits[row][in_window[row]].to(torch.int64) - lo for row in range(batch)] if levels else []
    bins = torch.arange(NUM_BINS, device=device)
    for level in range(1, levels + 1):
        shift = top - level * RADIX_BITS
        hist = torch.zeros(2, batch, NUM_BINS, dtype=torch.int64, device=device)
        wanted_rows = wanted.any(0).tolist()
        for row in range(batch):
            if not wanted_rows[row]:
                continue
            digits = (offsets[row] >> shift) & (NUM_BINS - 1)
            higher = offsets[row] >> (shift + RADIX_BITS)
            for target in range(2):
                chosen = digits[higher == prefixes[target, row]]
                hist[target, row] = torch.bincount(chosen, minlength=NUM_BINS)
        reduce(hist, "sum")
        cumulative = hist.cumsum(2)
        bin = (cumulative <= ranks.unsqueeze(2)).sum(2)
        before = torch.where(bins < bin.unsqueeze(2), hist, 0).sum(2)
        prefixes = torch.where(wanted, (prefixes << RADIX_BITS) | bin, prefixes)
        ranks = torch.where(wanted, ranks - before, ranks)
    lower = torch.where(wanted[0], lo + prefixes[0], lower)
    upper = torch.where(wanted[1], lo + prefixes[1], upper)
    lower = torch.where(n_nan > 0, nan_t, lower)
    upper = torch.where(n_nan > 0, nan_t, upper)
    return lower.to(bits.dtype), upper.to(bits.dtype), weight


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float, process_group=None,
                    radix: bool = False, return_order_statistics: bool = False):
    """Per-sample s = clamp(torch.quantile(|x0|, ratio), 1, max_value) over all but the first dimension of the
    float32 or float64 `x0`, bit for bit, with no size limit; shape (batch,).

    Args:
        process_group: the samples are sharded across the processes of this `torch.distributed` group (each
            holds the same batch, a part of every sample): s is the threshold of the whole samples, the same on
            every process. `torch.distributed.group.WORLD` for all processes.
        radix: use the radix select even without a process group (what the sharded variant runs).
        return_order_statistics: also return the (lower, upper, weight) that torch.quantile interpolates, each
            of shape (batch,) in x0's dtype (where s does not depend on an order statistic's exact value, a value
            on the same side of the window stands in for it).
    """
    if x0.dtype not in _PATTERNS:
        raise TypeError(f"x0 must be float32 or float64, got {x0.dtype}")
    batch = x0.shape[0] if x0.dim() else 1
    if batch == 0:  # (every process of a group holds the same batch: none runs collectives)
        empty = torch.empty(0, dtype=x0.dtype, device=x0.device)
        return (empty, (empty, empty, empty)) if return_order_statistics else empty
    flat = x0.reshape(batch, -1)
    lo, hi, bound = window_bits(max_value, x0.dtype)
    bits = abs_bits(flat)
    # An empty window (sample_max_value <= 1: s is sample_max_value, or NaN/inf from non-finite values) needs only
    # the counts, which the radix path takes without any histogram.
    if process_group is not None or radix or hi <= lo:
        reduce = all_reduce_hook(process_group) if process_group is not None else None
        lower, upper, weight = _radix_order_statistics(bits, ratio, x0.dtype, lo, hi, reduce)
    else:
        lower, upper, weight = _local_order_statistics(bits, ratio, x0.dtype, lo, hi)
    lower, upper = lower.view(x0.dtype), upper.view(x0.dtype)
    s = threshold_from_order_statistics(lower, upper, weight, bound)
    if return_order_statistics:
        return s, (lower, upper, weight.expand(batch))
    return s


def threshold(x0: torch.Tensor, ratio: float, max_value: float, process_group=None) -> torch.Tensor:
    """Dynamic thresholding: clamp(x0, -s, s) / s per sample, s from `threshold_scale` (same arguments)."""
    batch = x0.shape[0] if x0.dim() else 1
    if x0.requires_grad and torch.is_grad_enabled():
        from fastddim.autograd import threshold_scale as differentiable_scale  # (it builds on this module)

        s = differentiable_scale(x0, ratio, max_value, process_group)
    else:
        s = threshold_scale(x0, ratio, max_value, process_group)
    s = s.view((batch,) + (1,) * max(x0.dim() - 1, 0))
    if x0.dim() == 0:
        s = s.view(())
    return torch.clamp(x0, -s, s) / s
