"""The optional C kernel of the CPU FP8 cast and max-abs (shards/fp8/_fp8*.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and shards.fp8.native_cast falls
back to torch. No -march flags: the build must run on every CPU of a cluster (the kernel
picks its AVX2 loops at run time). -ffp-contract=off: the codes must equal torch's separately
rounded fp32 operations, so no fused multiply-add even if CFLAGS enable FMA.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("shards.fp8._fp8cast", ["shards/fp8/_fp8cast.c", "shards/fp8/_fp8maxabs.c"],
                             depends=["shards/fp8/_fp8cast.h"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
