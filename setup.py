"""Builds tilesmith: pure Python (Triton + torch backends) everywhere, plus the CUDA
extensions tilesmith._C (sm_80/sm_90 + PTX) and tilesmith._C_sm90a (Hopper-only) when nvcc
is found and TILESMITH_SKIP_CUDA_BUILD is not set.

Environment:
  TILESMITH_SKIP_CUDA_BUILD=1   install without compiling CUDA code
  TILESMITH_CUDA_ARCHS          architectures for tilesmith._C, e.g. "8.0;8.6;9.0+PTX"
                                (default "8.0;9.0+PTX"; 8.0 is the minimum: mma.sync bf16)
  CUDA_HOME                     toolkit root; found from nvcc (wrapper scripts included)
  MAX_JOBS                      parallel compile jobs (ninja), as for any torch extension
"""

import copy
import os
import re
import shutil
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def find_cuda_home():
    """The toolkit root, or None. Where `nvcc` on PATH is a wrapper script (as on our
    machines: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), torch would guess
    /usr/local, so read the real path out of the script."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:
            text = real.read_bytes()[:4096]
            if text.startswith(b"#!"):
                for match in re.findall(rb"(/[^\s\"']+)/bin/nvcc", text):
                    candidates.insert(0, Path(match.decode()))
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def gencode_flags(arch_list):
    """'8.0;9.0+PTX' -> nvcc -gencode flags (SASS for each, PTX where '+PTX')."""
    flags = []
    for entry in arch_list.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        number = entry.removesuffix("+PTX").replace(".", "")
        if not number.isdigit() or int(number) < 80:
            sys.exit(f"TILESMITH_CUDA_ARCHS: {entry!r} is not an architecture >= 8.0 "
                     "(the tensor-core kernels need mma.sync with bf16, sm_80 and newer)")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def cuda_extensions():
    if os.environ.get("TILESMITH_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        print("tilesmith: TILESMITH_SKIP_CUDA_BUILD set: pure-Python install")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("tilesmith: nvcc not found: pure-Python install (Triton and torch backends)")
        return [], {}
    # torch.utils.cpp_extension reads these at import time; without an arch list and
    # without a GPU its arch detection fails (our flags name the archs, so it is unused).
    os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if shutil.which("ccache"):
        # ccache in front of both compilers; torch's ninja build honours CC/CXX and
        # PYTORCH_NVCC.
        os.environ.setdefault("CC", "ccache gcc")
        os.environ.setdefault("CXX", "ccache g++")
        os.environ.setdefault("PYTORCH_NVCC", f"ccache {cuda_home / 'bin' / 'nvcc'}")
        print("tilesmith: using ccache")

    common_nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
    cxx = ["-O3", "-std=c++20"]  # torch 2.14 headers need C++20; kernel files see no torch
    archs = os.environ.get("TILESMITH_CUDA_ARCHS", "8.0;9.0+PTX")
    generic = CUDAExtension(
        name="tilesmith._C",
        sources=["csrc/registration.cpp", "csrc/matmul/matmul_api.cpp",
                 "csrc/gemm/gemm_api.cpp", "csrc/attention/attention_api.cpp",
                 "csrc/conv2d/conv2d_api.cpp",
                 *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*/*.cu")
                         if not p.stem.endswith("_sm90a"))],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": common_nvcc + gencode_flags(archs)},
        py_limited_api=False,
    )
    hopper = CUDAExtension(
        name="tilesmith._C_sm90a",
        sources=["csrc/registration_sm90a.cpp", "csrc/fp8/fp8_api.cpp",
                 *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*/*_sm90a.cu"))],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx,
                            "nvcc": common_nvcc + ["-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [generic, hopper], {"build_ext": TimedBuildExt.wrap(BuildExtension)}


class TimedBuildExt:
    @staticmethod
    def wrap(base):
        class Timed(base.with_options(use_ninja=True)):
            """Both extensions compile at once, each in its own ninja run of MAX_JOBS jobs:
            one after the other, the second could not start before the first's slowest
            file (a matmul file, 30-60 s) was done. On the 16 cores of a GPU machine that
            was a third of the build (modeled from each file's measured compile time: 65 s
            of compiling one after the other, 43 s at once; on 2 cores no change). Each
            gets a build directory of its own: torch writes one build.ninja per directory."""

            def finalize_options(self):
                super().finalize_options()
                if self.parallel is None:
                    self.parallel = len(self.extensions or ()) or None

            def build_extension(self, ext):
                # A shallow copy per thread: the same compiler, its own build_temp.
                own = copy.copy(self)
                own.build_temp = os.path.join(self.build_temp, ext.name)
                super(Timed, own).build_extension(ext)

            def run(self):
                start = time.perf_counter()
                super().run()
                print(f"tilesmith: CUDA extensions built in {time.perf_counter() - start:.1f} s "
                      f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'default')})")
        return Timed


ext_modules, cmdclass = cuda_extensions()

setup(
    name="tilesmith",
    version="0.1.0",
    description="Readable CUDA C++ and Triton kernels for matmul, conv2d, attention and "
    "mixed-precision GEMM, as PyTorch custom ops",
    package_dir={"tilesmith": "python/tilesmith", "tilesmith.kernels": "kernels"},
    packages=["tilesmith", "tilesmith.ops", "tilesmith.nn", "tilesmith.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest"]},
)
