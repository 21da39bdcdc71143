"""Fused DDIM step: one Triton kernel and its launcher.

The kernel reads model_output, sample (and the noise, when there is any) once and writes prev_sample and
pred_original_sample once. It computes in float32 (float64 for float64 outputs) and rounds once. The step
coefficients come from a row of `fastddim.schedule.step_table` in device memory, so a timestep never has to be
turned into numbers on the host. Arguments are trusted here: `fastddim.ops` checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
MAX_RANK = 5
BLOCK_SIZE = 1024
INT32_LIMIT = 2**31 - 1


@triton.jit
def _ddim_step_kernel(
    model_output_ptr, sample_ptr, noise_ptr, prev_ptr, x0_ptr, coef_ptr,
    eta, clip_range, n_elements,
    size_1, size_2, size_3, size_4,
    m_stride_0, m_stride_1, m_stride_2, m_stride_3, m_stride_4,
    x_stride_0, x_stride_1, x_stride_2, x_stride_3, x_stride_4,
    n_stride_0, n_stride_1, n_stride_2, n_stride_3, n_stride_4,
    PREDICTION: tl.constexpr,  # 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    STRIDED: tl.constexpr,  # False: all tensors share one dense layout, index memory directly
    INT64: tl.constexpr,  # offsets can pass 2**31 - 1
    MATH_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements

    if STRIDED:
        # Logical index (i0, ..., i4) of each element, then each input's own strides; outputs are contiguous.
        i4 = offsets % size_4
        rest = offsets // size_4
        i3 = rest % size_3
        rest = rest // size_3
        i2 = rest % size_2
        rest = rest // size_2
        i1 = rest % size_1
        i0 = rest // size_1
        m_offsets = i0 * m_stride_0 + i1 * m_stride_1 + i2 * m_stride_2 + i3 * m_stride_3 + i4 * m_stride_4
        x_offsets = i0 * x_stride_0 + i1 * x_stride_1 + i2 * x_stride_2 + i3 * x_stride_3 + i4 * x_stride_4
        n_offsets = i0 * n_stride_0 + i1 * n_stride_1 + i2 * n_stride_2 + i3 * n_stride_3 + i4 * n_stride_4
    else:
        m_offsets = offsets
        x_offsets = offsets
        n_offsets = offsets

    # Coefficients in float64 (columns as in fastddim.schedule), the eta terms as fastddim.schedule.noise_scales.
    sqrt_alpha_t64 = tl.load(coef_ptr + 0)
    sqrt_beta_t64 = tl.load(coef_ptr + 1)
    sqrt_alpha_prev64 = tl.load(coef_ptr + 2)
    beta_prev64 = tl.load(coef_ptr + 3)
    variance64 = tl.load(coef_ptr + 4)
    std64 = tl.sqrt(variance64) * eta  # eta arrives as float32; the product is float64
    radicand = beta_prev64 - std64 * std64
    direction64 = tl.sqrt(tl.where(radicand < 0.0, 0.0, radicand))

    if MATH_FP64:
        math_dtype = tl.float64
    else:
        math_dtype = tl.float32
    sqrt_alpha_t = sqrt_alpha_t64.to(math_dtype)
    sqrt_beta_t = sqrt_beta_t64.to(math_dtype)
    sqrt_alpha_prev = sqrt_alpha_prev64.to(math_dtype)
    direction = direction64.to(math_dtype)

    m = tl.load(model_output_ptr + m_offsets, mask=mask).to(math_dtype)
    x = tl.load(sample_ptr + x_offsets, mask=mask).to(math_dtype)

    if PREDICTION == 0:
        x0 = tl.math.div_rn(x - sqrt_beta_t * m, sqrt_alpha_t)
        eps = m
    elif PREDICTION == 1:
        x0 = m
        eps = tl.math.div_rn(x - sqrt_alpha_t * m, sqrt_beta_t)
    else:
        x0 = sqrt_alpha_t * x - sqrt_beta_t * m
        eps = sqrt_alpha_t * m + sqrt_beta_t * x

    if CLIP:
        x0 = tl.clamp(x0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)

    if USE_CLIPPED:
        eps = tl.math.div_rn(x - sqrt_alpha_t * x0, sqrt_beta_t)

    prev = sqrt_alpha_prev * x0 + direction * eps
    if HAS_NOISE:
        noise = tl.load(noise_ptr + n_offsets, mask=mask).to(math_dtype)
        prev = prev + std64.to(math_dtype) * noise

    tl.store(prev_ptr + offsets, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# Whether Triton decorated the kernel for its interpreter (TRITON_INTERPRET=1 when this module was imported):
# only then can it run on CPU tensors.
INTERPRETED = type(_ddim_step_kernel).__name__ == "InterpretedFunction"


def is_dense(tensor: torch.Tensor) -> bool:
    """True if the tensor's elements fill its memory span exactly once (any dimension order, no gaps)."""
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(tensor.shape, tensor.stride()) if s != 1), key=lambda p: p[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _strided_layout(tensors, shape):
    """Shape and per-tensor strides padded to MAX_RANK dims (leading size-1 dims, stride 0)."""
    pad = MAX_RANK - len(shape)
    sizes = (1,) * pad + tuple(shape)
    strides = [(0,) * pad + tuple(t.stride()) for t in tensors]
    return sizes, strides


def _max_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: torch.Tensor,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    variance_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DDIM step on the Triton kernel; returns `(prev_sample, pred_original_sample)`.

    Args:
        model_output, sample: tensors of one shape and device; float16, bfloat16, float32 or float64, any
            strides. Outputs take their promoted dtype and, when both inputs share one dense layout (contiguous,
            channels_last, ...), that layout; otherwise they are contiguous.
        coefficients: a float64 row of `fastddim.schedule.step_table` on the same device.
        eta: the noise weight; the noise term is `eta * sqrt(variance) * variance_noise`.
        prediction_type: "epsilon", "sample" or "v_prediction".
        clip_sample, clip_sample_range: clamp pred_original_sample to [-range, range].
        use_clipped_model_output: re-derive the noise prediction from the clipped pred_original_sample.
        variance_noise: the standard normal noise, same shape, or None for no noise term.
    """
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    inputs = [model_output, sample] + ([variance_noise] if variance_noise is not None else [])
    shared_dense = is_dense(sample) and all(t.stride() == sample.stride() for t in inputs)
    if len(sample.shape) > MAX_RANK and not shared_dense:
        inputs = [t.contiguous() for t in inputs]
        model_output, sample = inputs[0], inputs[1]
        variance_noise = inputs[2] if variance_noise is not None else None
        shared_dense = True
    if shared_dense:
        prev = torch.empty_like(sample, dtype=out_dtype)
        sizes, strides = (1,) * MAX_RANK, [(0,) * MAX_RANK] * 3
    else:
        prev = torch.empty(sample.shape, dtype=out_dtype, device=sample.device)
        sizes, strides = _strided_layout(inputs, sample.shape)
        if variance_noise is None:
            strides.append((0,) * MAX_RANK)
    x0 = torch.empty_like(prev)
    n_elements = sample.numel()
    if n_elements == 0:
        return prev, x0
    int64 = max([n_elements - 1] + [_max_offset(t) for t in inputs]) > INT32_LIMIT - BLOCK_SIZE
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _ddim_step_kernel[grid](
        model_output, sample, variance_noise if variance_noise is not None else sample, prev, x0, coefficients,
        float(eta), float(clip_sample_range), n_elements,
        *sizes[1:], *strides[0], *strides[1], *strides[2],
        PREDICTION=PREDICTION_CODES[prediction_type],
        CLIP=bool(clip_sample),
        USE_CLIPPED=bool(use_clipped_model_output),
        HAS_NOISE=variance_noise is not None,
        STRIDED=not shared_dense,
        INT64=int64,
        MATH_FP64=out_dtype == torch.float64,
        BLOCK=BLOCK_SIZE,
    )
    return prev, x0
