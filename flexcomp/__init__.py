"""flexcomp: attention variants as tiny Python functions, compiled to fused Triton kernels."""
