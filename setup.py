"""Lists the Cython extensions; everything else lives in pyproject.toml.

Compiler directives are set once here. MATCHER_DEBUG_NATIVE=1 turns bounds and
wraparound checks back on (and drops optimisation) for a debugging build.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MATCHER_DEBUG_NATIVE") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
}

# No -ffast-math and no FMA contraction: the kernels keep the numpy twins' float32
# rounding so that parity tests can be tight.
optimise = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-ffp-contract=off"]
openmp = ["-fopenmp"]


def extension(name: str, source: str, parallel: bool) -> Extension:
    return Extension(
        name,
        sources=[source],
        extra_compile_args=optimise + (openmp if parallel else []),
        extra_link_args=openmp if parallel else [],
    )


extensions = [
    extension("matcher._imaging", "native/imaging.pyx", parallel=True),  # prange over faces
    extension("matcher._scrfd", "native/scrfd.pyx", parallel=False),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives,
                            include_path=["native"]))
