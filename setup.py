"""Lists the Cython extensions; everything else lives in pyproject.toml.

Compiler directives are set once here. MATCHER_DEBUG_NATIVE=1 turns bounds and
wraparound checks back on (and drops optimisation) for a debugging build.

No OpenMP: the kernels run serially with the GIL released and parallelism comes from
concurrent requests; an OpenMP team stalls whenever another process holds a core
(docs/pipeline.md#native-kernels).
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

extensions = [
    Extension("matcher._imaging", sources=["native/imaging.pyx"], extra_compile_args=optimise),
    Extension("matcher._scrfd", sources=["native/scrfd.pyx"], extra_compile_args=optimise),
]

# Generated C goes to a directory per mode: cythonize only compares timestamps, so a
# shared directory would keep serving release C to a debug build and vice versa.
setup(ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["native"],
                            build_dir=f"build/cython-{'debug' if DEBUG else 'release'}"))
