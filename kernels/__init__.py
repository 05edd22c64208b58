"""Triton kernels of stfast, installed as ``stfast.kernels``; import them through that name."""
