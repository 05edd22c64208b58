"""Package layout: the Triton kernels live in the top-level ``kernels/`` folder of the repository
but are installed as ``stfast.kernels`` (no generic top-level ``kernels`` module in site-packages)."""

from setuptools import find_packages, setup

packages = find_packages(include=["stfast", "stfast.*"])
packages += ["stfast.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]

setup(
    packages=packages,
    package_dir={"stfast": "stfast", "stfast.kernels": "kernels"},
)
