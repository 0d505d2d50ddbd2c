"""Stages the client's modules from the repository's matcher/ package, then packages them.

The modules are copied (not referenced with ``../..``) so that a wheel and an sdist both
hold exactly what a lane daemon needs and nothing else; the list is CLIENT_MODULES.
"""
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "matcher"
STAGE = HERE / "build" / "staged"
# The client and what it imports: nothing else of the package (tests/test_layout.py holds
# client.py, hedging.py and transport.py to importing nothing server-side).
CLIENT_MODULES = ("__init__.py", "client.py", "hedging.py", "transport.py", "errors.py",
                  "v1/__init__.py", "v1/matcher_pb2.py", "v1/matcher_pb2.pyi",
                  "v1/matcher_pb2_grpc.py")

if SOURCE.is_dir():  # building from the repository (an sdist carries the staged copy)
    if STAGE.exists():
        shutil.rmtree(STAGE)
    for name in CLIENT_MODULES:
        target = STAGE / "matcher" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SOURCE / name, target)

setup(package_dir={"": "build/staged"}, packages=["matcher", "matcher.v1"],
      package_data={"matcher.v1": ["*.pyi"]})
