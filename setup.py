"""Builds the native kernels of reclora_kernels (csrc/) as reclora_kernels._C.

The native-kernels work adds the C++/CUDA sources; with none present this installs the pure
Python packages only.
"""

from setuptools import setup

setup()
