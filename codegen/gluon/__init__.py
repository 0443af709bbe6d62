"""Hand-written Gluon kernels for Hopper (sm_90): the start of issue 22 (a warp-specialized forward).

Importing this package imports `triton.experimental.gluon`; flexcomp's dispatch does not use it yet.
"""
