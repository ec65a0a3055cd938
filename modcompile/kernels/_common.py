"""Small host-side helpers shared by the kernels' launch wrappers.

Torch only (no triton import at module level): pooling.py and block_lists.py must stay importable
without triton.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch

from .state import KERNEL_STATE

LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e))

# What the attention kernels (forward and backward) and the sparsity map kernel take.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (any value but empty or "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@KERNEL_STATE.memo
@lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether the Triton the kernels need imports here (tensor descriptors are their newest need)."""
    try:
        import triton  # noqa: F401
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def attention_path(device: torch.device, dtype: torch.dtype, head_dim: int,
                   block_size: int | None = None) -> tuple[str, str]:
    """Which block-sparse attention path can run these inputs, and why not the Triton kernel.

    Returns ``("triton", "")``, ``("reference", why)`` (the torch reference runs instead: CPU
    without TRITON_INTERPRET, or bf16 under the interpreter, whose bf16 dot is wrong) or
    ``("none", why)``: the Triton path is the one this device means (CUDA, or CPU under the
    interpreter, which stands in for the GPU) and it lacks the head_dim, dtype or block size.
    The one support predicate: the rewrite pass keeps ``"none"`` sites dense with ``why``, and
    ``modcompile.dispatch.use_triton`` dispatches on it at run time."""
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return "reference", f"no Triton on {device.type} without TRITON_INTERPRET=1"
    if not triton_importable():
        if device.type == "cuda":
            return "none", "no Triton block-sparse kernel available (triton not importable)"
        return "reference", "triton not importable"
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        return "none", f"dtype {str(dtype).replace('torch.', '')} not supported by the kernel (supported: {names})"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return "none", f"head_dim {head_dim} not supported by the kernel (supported: {SUPPORTED_HEAD_DIMS})"
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        return "none", f"block_size {block_size} not supported by the kernel (supported: {SUPPORTED_BLOCK_SIZES})"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "reference", "bfloat16 under the Triton interpreter (its bf16 dot is wrong)"
    if (device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available()
            and device_capability(device)[0] < 8):
        return "none", "bfloat16 needs compute capability 8.0 or newer"
    return "triton", ""


def device_capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability`` cached per device (``KERNEL_STATE.capability``): the
    launch wrappers ask on every call."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = KERNEL_STATE.capability.get(index)
    if cap is None:
        cap = KERNEL_STATE.capability[index] = torch.cuda.get_device_capability(index)
    return cap


def padded_head_dim(head_dim: int) -> int:
    """The head dim rounded up to a power of two, at least 16 (tl.arange and tl.dot need both)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def dot_precision(dtype: torch.dtype) -> str:
    # Exact fp32 products for fp32 inputs; half inputs are exact in tf32 anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied only when its last dim is strided (the kernels address it with offset 1)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def empty_heads_last(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor like ``x`` (B, H, N, D), stored (B, N, H, D): merging heads afterwards
    (the usual transpose(1, 2).reshape after attention) is then free."""
    B, H, N, D = x.shape
    return x.new_empty(B, N, H, D).transpose(1, 2)


VALIDATE_ENV = "MODCOMPILE_VALIDATE"


def validation_requested(validate: bool | None) -> bool:
    """``validate`` itself, or when None whether ``MODCOMPILE_VALIDATE`` asks for the value checks
    (any value but empty or "0"): the debug switch for code that does not pass ``validate``."""
    if validate is not None:
        return bool(validate)
    return os.environ.get(VALIDATE_ENV, "0") not in ("", "0")


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether these (B, H, N, D) tensors can be read through tensor descriptors: sm_90+ (or the
    interpreter), unit last stride, 16-byte aligned base and batch/head/row strides."""
    for t in tensors:
        if not interpreting() and (not t.is_cuda or device_capability(t.device)[0] < 9):
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((t.stride(i) * size) % 16 for i in range(3)):
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream):
    # Global scratch for the tensor descriptors that kernels build on the device.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Triton keeps its allocator in a ContextVar: set it in *this* thread (autograd runs the
    backward on its own device thread) unless one is already there."""
    import triton  # here, not at the top: this module stays importable without triton

    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # private API moved: setting it again is harmless
        pass
    triton.set_allocator(_tma_scratch)
