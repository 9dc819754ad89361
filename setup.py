# The cffi extension (kernels/*.c) is built here at install time; dllama_mpi/kernels.py rebuilds it
# at first import when it is missing (e.g. a source checkout used without installing).
from setuptools import setup

setup(cffi_modules=["dllama_mpi/_build_kernels.py:ffibuilder"])
