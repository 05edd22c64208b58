"""Package layout: the Triton kernels live in the top-level ``kernels/`` folder of the repository
but are installed as ``stfast.kernels`` (no generic top-level ``kernels`` module in site-packages).

The C++/CUDA extension (``csrc/``) is built into ``stfast._C`` when torch is importable here and a
C++ compiler is found; the CUDA kernels join when torch has CUDA and ``nvcc`` is found
(``STFAST_CUDA_ARCH``, e.g. ``"9.0"`` or ``"8.0;9.0"``, sets the arch list). ``STFAST_SKIP_EXT=1``
skips it. pip's default build isolation hides the installed torch, so ``pip install -e .`` then
installs without the extension and ``stfast`` builds it just in time on first use (ninja, cached);
``pip install --no-build-isolation -e .`` builds it now. A failed build never fails the install:
the ``cpu`` / ``cuda`` backends then report why they are unavailable.
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"

packages = find_packages(include=["stfast", "stfast.*"])
packages += ["stfast.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]


def _note(message: str) -> None:
    print(f"stfast setup: {message}", file=sys.stderr)


def _sources_hash(root: Path) -> str:
    # Same rule as stfast.ops._ext.sources_hash (setup.py cannot import the package).
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in {".cpp", ".h", ".cu", ".cuh"}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return "src" + digest.hexdigest()[:16]


def _sources(cuda: bool) -> list[str]:
    # Same rule as stfast.ops._ext.source_files.
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if cuda:
        files += sorted((CSRC / "cuda").glob("*.cpp")) + sorted((CSRC / "cuda").glob("*.cu"))
    return [str(p.relative_to(HERE)) for p in files]


def _extension():
    """``(ext_modules, cmdclass)`` for stfast._C, or ``([], {})`` with a note saying why not."""
    if os.environ.get("STFAST_SKIP_EXT") == "1":
        _note("STFAST_SKIP_EXT=1: installing without the C++/CUDA extension")
        return [], {}
    if not (CSRC / "stfast_ext.cpp").is_file():
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note("torch is not importable in this build environment (pip build isolation): installing without the "
              "C++ extension; it is built just in time on first use, or now with "
              "`pip install --no-build-isolation -e .`")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        _note(f"no C++ compiler found ({compiler}): installing without the C++ extension")
        return [], {}

    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and not cuda:
        _note("torch has CUDA but nvcc was not found (set CUDA_HOME): building the CPU kernels only")
    if cuda and os.environ.get("STFAST_CUDA_ARCH") and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["STFAST_CUDA_ARCH"]
    defines = [f"-DSTFAST_SOURCES_HASH={_sources_hash(CSRC)}"] + (["-DSTFAST_WITH_CUDA"] if cuda else [])
    # -fopenmp: at::parallel_for is inline and runs in parallel only when compiled with OpenMP.
    # -fno-trapping-math, -fno-math-errno (as torch builds itself; results unchanged): let loops with
    # selects like leaky_relu vectorise. Same flags as stfast.ops._ext.CXX_FLAGS.
    args = {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *defines], "nvcc": ["-O3", *defines]}  # torch adds -std and the archs
    make = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    extension = make(
        "stfast._C",
        _sources(cuda),
        include_dirs=[str(CSRC)],
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed compile leaves the package without the extension instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                _note(f"building the C++ extension failed ({err}); installing without it "
                      "(the cpu/cuda backends will say why they are unavailable)")

    _note(f"building the C++{'/CUDA' if cuda else ''} extension stfast._C (STFAST_SKIP_EXT=1 skips)")
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    packages=packages,
    package_dir={"stfast": "stfast", "stfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
