"""Package discovery and the kernel libraries; everything else is in pyproject.toml.

Packages: `naslung/` plus the top-level `kernels/` and `export/` folders, which install as
`naslung.kernels` and `naslung.export` (with their subpackages) once they exist.

Kernel libraries: CMakeLists.txt builds csrc/ into a host library always and into a CUDA
library where a CUDA compiler is found. Each is declared as an extension module of
`naslung.native` (the CUDA one optional), so that setuptools puts it beside the package's
Python files, in the source tree for an editable install; `naslung.native.library` loads them
with ctypes. CMake runs once per build.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).parent
TOP_LEVEL_SUBPACKAGES = {"naslung.kernels": "kernels", "naslung.export": "export"}
LIBRARIES = {"naslung.native.libnaslung_host": "libnaslung_host.so",
             "naslung.native.libnaslung_cuda": "libnaslung_cuda.so"}

packages = find_packages(include=["naslung", "naslung.*"])
package_dir = {}
for name, folder in TOP_LEVEL_SUBPACKAGES.items():
    if (ROOT / folder / "__init__.py").is_file():
        package_dir[name] = folder
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]


class CMakeLibraries(build_ext):
    """Configure CMakeLists.txt once, then build each extension's library as its own target: a
    CUDA build that fails leaves the host library built and the optional CUDA one skipped."""

    def build_extensions(self) -> None:
        self.cmake_build = self._configure()
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        library = LIBRARIES[ext.name]
        target = Path(self.get_ext_fullpath(ext.name))
        # No stale copy may outlive a build that did not make it (ctypes would load it).
        for old in (target, ROOT / "naslung" / "native" / target.name):
            old.unlink(missing_ok=True)
        build = self.cmake_build
        built = build / library
        built.unlink(missing_ok=True)
        done = subprocess.run(["cmake", "--build", str(build), "--target", Path(library).stem[3:],
                               "--parallel", str(os.cpu_count() or 1)])
        if done.returncode != 0 or not built.is_file():
            raise CompileError(f"{library} was not built (for the CUDA library: no CUDA compiler, or its "
                               "build failed; the CMake output above says which)")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)

    def _configure(self) -> Path:
        # In the source tree (build/ is ignored): a reinstall rebuilds only what changed.
        build = ROOT.resolve() / "build" / "cmake"
        configure = ["cmake", "-S", str(ROOT.resolve()), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
        if os.environ.get("NASLUNG_CUDA_ARCHITECTURES"):  # e.g. 90: only the GPU at hand
            configure.append(f"-DNASLUNG_CUDA_ARCHITECTURES={os.environ['NASLUNG_CUDA_ARCHITECTURES']}")
        if shutil.which("ninja") and not (build / "CMakeCache.txt").is_file():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        return build


setup(packages=packages, package_dir=package_dir,
      ext_modules=[Extension("naslung.native.libnaslung_host", sources=[]),
                   Extension("naslung.native.libnaslung_cuda", sources=[], optional=True)],
      cmdclass={"build_ext": CMakeLibraries})
