"""Hand-written Gluon kernels for Hopper (sm_90): issue 22's warp-specialized forward.

attention.py: the kernels; mods.py: a variant's mods rendered for them; dispatch.py: kernel_options
{"BACKEND": "GLUON"}.  Importing this package imports nothing; attention.py and mods.py's generated files import
`triton.experimental.gluon` (Triton 3.6's API), which dispatch.py reaches only once a call fits the kernel.
"""
