"""Build hook for the optional C extension fp8probe._fastpath (all metadata lives in pyproject.toml)."""
from setuptools import Extension, setup

# -ffp-contract=off: gcc's default (fast) fuses a*b+c into FMA, which would break bit-exactness with
# the reference; -fno-trapping-math: FP exception flags are never read, so the compiler may turn
# selects on values that could be NaN into vector blends (the scaled-cast loops vectorise only with
# it); it changes no value (no reassociation, no finite-math assumption); no -ffast-math, no -march=native (wheels must run on other CPUs: the AVX2 loops are
# compiled with a target attribute and chosen at run time). optional=True: if the compiler or the
# Python headers are missing, the install still succeeds and fp8probe uses the torch reference.
setup(
    ext_modules=[
        Extension(
            "fp8probe._fastpath",
            sources=["fp8probe/_fastpath.c"],
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-pthread"],
            extra_link_args=["-pthread"],
            libraries=["m"],  # rintf
            optional=True,
        )
    ],
)
