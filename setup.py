"""Build glue for the C kernels; all metadata lives in pyproject.toml.

`converters/` sits at the top level of the repository (one writer per target) but installs as
`ondevice.converters`, so it never pollutes the global import namespace. `apps/web/` (the browser chat pages and
their vendored onnxruntime-web) installs as data under `ondevice/web/`, where `ondevice serve` finds it.
"""

import glob
import sys

from setuptools import Extension, find_packages, setup

extra_compile_args = []
extra_link_args = []
if sys.platform != "win32":
    extra_compile_args = ["-O3", "-std=c11", "-pthread", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    extra_link_args = ["-pthread"]

kernels = Extension(
    "ondevice._kernels",
    sources=sorted(glob.glob("kernels/*.c")) + sorted(glob.glob("bindings/*.c")),
    include_dirs=["kernels", "bindings"],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(
    packages=find_packages(include=["ondevice", "ondevice.*"]) + ["ondevice.converters", "ondevice.web"],
    package_dir={"ondevice.converters": "converters", "ondevice.web": "apps/web"},
    ext_modules=[kernels] if glob.glob("bindings/*.c") else [],
)
