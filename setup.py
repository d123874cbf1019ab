"""Package discovery: `naslung/` plus the top-level `kernels/` and `export/` folders, which
install as `naslung.kernels` and `naslung.export` (with their subpackages) once they exist.
Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

TOP_LEVEL_SUBPACKAGES = {"naslung.kernels": "kernels", "naslung.export": "export"}

packages = find_packages(include=["naslung", "naslung.*"])
package_dir = {}
for name, folder in TOP_LEVEL_SUBPACKAGES.items():
    if (Path(__file__).parent / folder / "__init__.py").is_file():
        package_dir[name] = folder
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
