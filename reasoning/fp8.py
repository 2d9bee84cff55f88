"""FP8 training for the hidden linear layers: `Float8Linear`, `convert_to_float8`, `fp8_disabled`.

Why: on Hopper-class GPUs an FP8 matmul runs at twice the bf16 rate, and the hidden projections (attention qkv/out,
MLP up/down) are most of a transformer's FLOPs. The recipe is the plain "dynamic tensorwise" one (as in torchao's
default and nanochat's fp8 option):

  - each operand gets ONE scale per tensor, recomputed every call from its absolute max (amax):
    scale = fp8_max / amax, so the largest element lands on the largest representable fp8 value;
  - forward: input and weight in e4m3 (3 mantissa bits, max 448) -- precision matters more than range;
  - backward: grad_output in e5m2 (2 mantissa bits, max 57344) -- gradients need range more than precision;
  - all three matmuls (output, grad_input, grad_weight) go through `torch._scaled_mm`, which multiplies the fp8
    operands, applies the two *inverse* scales and writes a high-precision result (float32 / bf16).

`torch._scaled_mm` layout rules (cuBLASLt; the CPU kernel in torch 2.13 is more permissive but we follow the
strict rules everywhere so CPU tests exercise the GPU code path): the first operand is row-major, the second
column-major, the inner dims and the second operand's dims are multiples of 16, the scales are float32 tensors
and at most one operand is e5m2. The row count of the activations (batch*time) is padded up to a multiple of 16
because it becomes the inner dim of the grad_weight matmul.

Master weights stay in high precision (the fp8 copies are transient), so optimizers and checkpoints never see
fp8. `Float8Linear` subclasses `nn.Linear`, so anything that counts FLOPs or finds layers by `nn.Linear` shapes
treats it the same. For evaluation, `with fp8_disabled(model):` runs the exact high-precision `F.linear`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FORWARD_DTYPE = torch.float8_e4m3fn  # input and weight
BACKWARD_DTYPE = torch.float8_e5m2  # grad_output
# Floor on amax: an all-zero tensor would otherwise give scale = max/0 = inf and 0*inf = NaN. With the floor the
# scale stays finite (448 / 1e-12 ~ 4.5e14 fits in float32) and zeros quantize to zeros.
AMAX_EPS = 1e-12
ALIGN = 16  # cuBLASLt fp8 matmuls need these dims to be multiples of 16


def quantize_tensorwise(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (x_fp8, inv_scale) with x ~= x_fp8.float() * inv_scale; inv_scale is a 0-d float32 tensor."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.detach().abs().amax().to(torch.float32).clamp(min=AMAX_EPS)
    scale = fp8_max / amax
    # the clamp guards against rounding pushing |x|*scale a hair past fp8_max (e4m3fn has no inf: it would be NaN)
    x_fp8 = (x.to(torch.float32) * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x_fp8, scale.reciprocal()


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 and t.stride(0) == t.size(1) else t.contiguous()


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(0) == 1 and t.stride(1) == t.size(0) else t.t().contiguous().t()


def scaled_matmul(a_fp8, a_inv_scale, b_fp8, b_inv_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) in out_dtype, fixing up the layouts `_scaled_mm` insists on."""
    return torch._scaled_mm(_row_major(a_fp8), _column_major(b_fp8), scale_a=a_inv_scale, scale_b=b_inv_scale,
                            out_dtype=out_dtype)


class _Float8Matmul(torch.autograd.Function):
    """out = x @ weight.T with all three matmuls in fp8. x (M, K), M a multiple of 16; weight (N, K)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x_fp8, x_inv = quantize_tensorwise(x, FORWARD_DTYPE)
        w_fp8, w_inv = quantize_tensorwise(weight, FORWARD_DTYPE)
        # the fp8 copies are what backward needs: saving them instead of x/weight also saves activation memory
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        # weight (N, K) row-major, so weight.T (K, N) is already column-major: no copy in the forward
        return scaled_matmul(x_fp8, x_inv, w_fp8.t(), w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        g_fp8, g_inv = quantize_tensorwise(grad_out, BACKWARD_DTYPE)  # (M, N)
        grad_x = scaled_matmul(g_fp8, g_inv, w_fp8, w_inv, ctx.x_dtype)  # (M, N) @ (N, K) -> (M, K)
        grad_w = scaled_matmul(g_fp8.t(), g_inv, x_fp8, x_inv, ctx.w_dtype)  # (N, M) @ (M, K) -> (N, K)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """`nn.Linear` whose matmuls run in fp8 (see the module docstring); same parameters, same state_dict keys.

    `fp8_enabled = False` (see `fp8_disabled`) makes it compute exactly what `nn.Linear` computes.
    """

    fp8_enabled: bool = True

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        """A Float8Linear sharing `linear`'s weight/bias Parameters (so optimizer param lists stay valid)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        # follow autocast like nn.Linear would: bf16 output under bf16 autocast, else the input's dtype
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        else:
            out_dtype = x.dtype
        lead_shape = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (M, K)
        rows = x2d.size(0)
        pad = -rows % ALIGN
        if pad:  # zero rows change neither amax nor grad_weight; their outputs are sliced away
            x2d = F.pad(x2d, (0, 0, 0, pad))
        out = _Float8Matmul.apply(x2d, self.weight, out_dtype)
        if pad:
            out = out[:rows]
        if self.bias is not None:
            out = out + self.bias.to(out_dtype)
        return out.reshape(*lead_shape, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={'on' if self.fp8_enabled else 'off'}"


def convert_to_float8(model: nn.Module, module_filter: Callable[[str, nn.Linear], bool] | None = None,
                      min_dim: int = 128) -> int:
    """Swap eligible `nn.Linear` modules of `model` for `Float8Linear` in place; returns how many were swapped.

    Eligible: both in/out features are multiples of 16 (the `_scaled_mm` rule) and at least `min_dim` (below that
    the quantization overhead outweighs the faster matmul), the qualified name does not contain "lm_head" (the
    logits are too sensitive; embeddings are `nn.Embedding` and never touched), and `module_filter(name, module)`
    returns True when given. Weight Parameters are kept, so an optimizer built before the swap still works.
    """
    if min_dim < 1:
        raise ValueError(f"min_dim={min_dim}: expected a positive integer")
    swaps = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name:  # exact type: converted or exotic subclasses stay as they are
            continue
        dims = (module.in_features, module.out_features)
        if any(d % ALIGN or d < min_dim for d in dims) or "lm_head" in name:
            continue
        if module_filter is not None and not module_filter(name, module):
            continue
        swaps.append(name)
    for name in swaps:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, Float8Linear.from_linear(getattr(parent, child_name)))
    return len(swaps)


@contextlib.contextmanager
def fp8_disabled(model: nn.Module):
    """Within the block every Float8Linear of `model` runs the plain high-precision matmul (for evaluation)."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    previous = [m.fp8_enabled for m in layers]
    for m in layers:
        m.fp8_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(layers, previous):
            m.fp8_enabled = state
