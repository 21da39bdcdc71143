"""Dynamic thresholding of samples sharded across processes: 2 processes, gloo backend, CPU tensors.

Each process holds the whole batch and a slice of every sample (cut along the height, unevenly, one shard possibly
empty). With the process group given, every process must find the threshold one process holding the whole samples
finds (torch.quantile of the whole |x0|), on both backends (the Triton kernels in Triton's interpreter without a
GPU), and its slice of the thresholded step must be that slice of the unsharded step, bit for bit.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
SHAPE = (3, 2, 9, 6)
# Height rows [start, stop) per rank, for each way of cutting: uneven, and one shard empty.
CUTS = {"uneven": [(0, 5), (5, 9)], "empty": [(0, 9), (9, 9)]}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def inputs():
    """Whole-sample step inputs (the same in every process): quantiles of |x0| inside [1, 3) for most samples;
    sample 1 holds an inf in the rows of rank 1 only, sample 2 a NaN in the rows of rank 0 only."""
    g = torch.Generator().manual_seed(0)
    model_output = torch.randn(SHAPE, generator=g) * 1.5
    sample = torch.randn(SHAPE, generator=g) * 3
    model_output[1, 0, 7, 2] = math.inf
    model_output[2, 1, 1, 1] = math.nan
    return model_output, sample


def worker(rank: int, init_file: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run interpreted on CPU tensors
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        check_shards(rank)
    finally:
        dist.destroy_process_group()


def check_shards(rank: int) -> None:
    import fastddim
    from fastddim import kernels, ops
    from fastddim import threshold as th

    group = dist.group.WORLD
    scheduler = fastddim.DDIMScheduler(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9,
                                       prediction_type="sample", clip_sample=False)
    scheduler.set_timesteps(10)
    table, t = scheduler._table, 100
    model_output, sample = inputs()
    ratio, max_value = 0.9, 3.0
    for cut, rows in CUTS.items():
        start, stop = rows[rank]
        m, x = model_output[:, :, start:stop].contiguous(), sample[:, :, start:stop].contiguous()
        # prediction_type="sample": x0 is model_output exactly, so the truth is torch.quantile of it.
        whole = torch.quantile(model_output.flatten(1).abs(), ratio, dim=1).clamp(min=1, max=max_value)
        assert math.isnan(whole[2]) and 1 < whole[0] < max_value  # the NaN sample, and one inside the window
        got = th.threshold_scale(m, ratio, max_value, process_group=group)
        torch.testing.assert_close(got, whole, rtol=0, atol=0, equal_nan=True, msg=f"torch {cut}")
        got = kernels.sample_thresholds(m, x, table, t, "sample", ratio, max_value,
                                        reduce=th.all_reduce_hook(group))
        torch.testing.assert_close(got, whole, rtol=0, atol=0, equal_nan=True, msg=f"triton {cut}")
        # A bound of at most 1: the select kernel writes s (the bound, or NaN where lerp gives NaN) from the
        # all-reduced order statistics; at ratio 1 sample 1's largest |x0| is its inf.
        for bound_ratio in (0.9, 1.0):
            bounded = torch.quantile(model_output.flatten(1).abs(), bound_ratio, dim=1).clamp(min=1, max=1.0)
            got = kernels.sample_thresholds(m, x, table, t, "sample", bound_ratio, 1.0,
                                            reduce=th.all_reduce_hook(group))
            torch.testing.assert_close(got, bounded, rtol=0, atol=0, equal_nan=True,
                                       msg=f"triton bound 1, ratio {bound_ratio}, {cut}")

        for backend in ("torch", "triton"):
            full = ops.ddim_step(model_output, sample, table, t, prediction_type="sample", thresholding=True,
                                 dynamic_thresholding_ratio=ratio, sample_max_value=max_value, backend=backend)
            shard = ops.ddim_step(m, x, table, t, prediction_type="sample", thresholding=True,
                                  dynamic_thresholding_ratio=ratio, sample_max_value=max_value, backend=backend,
                                  process_group=group)
            for ours, theirs in zip(shard, full):
                torch.testing.assert_close(ours, theirs[:, :, start:stop], rtol=0, atol=0, equal_nan=True,
                                           msg=f"{backend} step {cut}")

        # The scheduler, through its attribute (step keeps diffusers' signature).
        scheduler.threshold_process_group = group
        os.environ["FASTDDIM_BACKEND"] = "triton"
        sharded = scheduler.step(m, t, x)
        scheduler.threshold_process_group = None
        unsharded = scheduler.step(model_output, t, sample)
        os.environ.pop("FASTDDIM_BACKEND")
        torch.testing.assert_close(sharded.prev_sample, unsharded.prev_sample[:, :, start:stop], rtol=0, atol=0,
                                   equal_nan=True, msg=f"scheduler {cut}")
        torch.testing.assert_close(sharded.pred_original_sample,
                                   unsharded.pred_original_sample[:, :, start:stop], rtol=0, atol=0,
                                   equal_nan=True, msg=f"scheduler x0 {cut}")

    # Without the group each process thresholds its own shard: a different answer (the test can fail).
    start, stop = CUTS["uneven"][rank]
    local = th.threshold_scale(model_output[:, :, start:stop].contiguous(), ratio, max_value)
    whole = torch.quantile(model_output.flatten(1).abs(), ratio, dim=1).clamp(min=1, max=max_value)
    assert not torch.equal(local[0], whole[0])


def test_two_process_sharded_threshold_matches_whole_sample(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD_SIZE, join=True)
