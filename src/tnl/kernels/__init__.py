"""Kernels: what runs each operation of the model.

    config.py        KernelConfig (torch-free): the kernel choices, from flags (add_kernel_args)
    backend.py       Backend: built once from a KernelConfig and a device; the model calls it
    torch_ops.py     plain PyTorch: the CPU path and the reference for the CUDA kernels
    triton_decode.py Triton recurrent decode step and SimpleRMSNorm
    triton_gemm.py   Triton skinny GEMM for decode matmuls, its configs and tuned tables

`from tnl.kernels import Backend, KernelConfig` works; the names load on first use, so that
importing tnl.kernels.config does not import torch.
"""
from __future__ import annotations

__all__ = ["Backend", "BlockOps", "KernelConfig", "add_kernel_args", "kernel_config_from_args"]


def __getattr__(name: str):
    if name in ("Backend", "BlockOps"):
        from tnl.kernels import backend
        return getattr(backend, name)
    if name in ("KernelConfig", "add_kernel_args", "kernel_config_from_args"):
        from tnl.kernels import config
        return getattr(config, name)
    raise AttributeError(f"module 'tnl.kernels' has no attribute {name!r}")
