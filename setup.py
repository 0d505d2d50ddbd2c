"""Lists the Cython extensions; everything else lives in pyproject.toml.

Compiler directives are set once here. MATCHER_DEBUG_NATIVE=1 turns bounds and
wraparound checks back on for a debugging build.
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

openmp = ["-fopenmp"]
optimise = ["-O3"] if not DEBUG else ["-O0", "-g"]

extensions = [
    Extension(
        "matcher._native_core",
        sources=["native/_native_core.pyx"],
        extra_compile_args=optimise + openmp,
        extra_link_args=openmp,
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
