"""Builds the native kernels of reclora_kernels (csrc/) as the extension reclora_kernels._C.

    pip install --no-build-isolation -e .      (torch must already be installed)

- Always: the CPU kernels (csrc/registration.cpp, csrc/cpu/*.cpp).
- With a CUDA build of torch and nvcc found (no GPU needed): the CUDA kernels (csrc/cuda/*.cu)
  join the same extension. nvcc is found through $CUDA_HOME, then `nvcc` on PATH, resolved
  through wrapper scripts to the real toolkit root (torch's own detection follows a wrapper
  to the wrong folder).
- Env: RECLORA_NO_CUDA=1 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0";
  MAX_JOBS caps ninja's parallel compile jobs.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root() -> str | None:
    """The CUDA toolkit folder holding bin/nvcc, include/cuda_runtime.h and lib64."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        # A wrapper script (here: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`) names the real one.
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                found = re.search(rb"(/\S+)/bin/nvcc\b", head)
                if found:
                    candidates.append(found.group(1).decode())
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _extensions():
    import torch

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [os.path.relpath(p, ROOT)
                    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 in
    # torch 2.14, C++17 in 2.11).
    # -g0: no debug info (Python's CFLAGS add -g; torch's own wheels ship none). It changes no
    # code, and the build's compile CPU time fell ~20% here (71 s -> 57 s user, 2-core machine,
    # the CPU and CUDA kernels; lora_mix_cpu.cpp alone about halved), which is most of
    # `make test`'s set-up after the torch install.
    cxx_flags = ["-O3", "-g0"]
    link_flags = []
    # at::parallel_for is an inline `#pragma omp parallel` when torch's ATen backend is
    # OpenMP: without -fopenmp the extension's loops ran on one thread. Measured here (idle
    # 2-core CPU, fp32, d = 1024, T = 512, R = 4, M = 16): the cpu op took 41.9 ms on 2
    # threads, the same as on 1, while F.linear took 20.1 ms. libgomp.so.1 resolves to the
    # copy torch has already loaded, so there is one OpenMP runtime.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    with_cuda = False
    if torch.version.cuda is None:
        print("reclora: CPU-only torch, building the CPU kernels only (no CUDA kernels)")
    elif os.environ.get("RECLORA_NO_CUDA") == "1":
        print("reclora: RECLORA_NO_CUDA=1, building the CPU kernels only")
    else:
        root = _toolkit_root()
        if root is None:
            print("reclora: nvcc not found, building the CPU kernels only (no CUDA kernels)")
        else:
            # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
            os.environ["CUDA_HOME"] = root
            with_cuda = True
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    from torch.utils import cpp_extension

    if not with_cuda:
        ext = cpp_extension.CppExtension(
            "reclora_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags)
        return [ext], cpp_extension.BuildExtension

    include_dirs = []
    # ATen's CUDA headers include cusparse.h/cublas_v2.h, which the pip wheels ship in
    # nvidia/cu13/include (or nvidia/*/include for older CUDA) rather than the toolkit.
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                 os.path.dirname(os.path.dirname(torch.__file__))}:
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cusparse", "include")))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cublas", "include")))
    print(f"reclora: building the CPU and CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    ext = cpp_extension.CUDAExtension(
        "reclora_kernels._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-Xcompiler", "-g0"]},
        extra_link_args=link_flags,
    )
    return [ext], cpp_extension.BuildExtension


def _setup():
    if any(cmd in sys.argv for cmd in ("egg_info", "dist_info", "sdist", "--version", "clean")):
        setup()
        return
    ext_modules, build_ext = _extensions()
    setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext.with_options(use_ninja=True)})


_setup()
