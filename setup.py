"""setup.cfg has the metadata; this only keeps `virby.image` data-only: that package ships the
guest's files and lock (image/guest/, image/guest.lock.json), not image/'s development scripts
(boot-guest.py imports the repository's testing/ helpers)."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        if package == "virby.image":
            return []
        return super().find_package_modules(package, package_dir)


setup(cmdclass={"build_py": BuildPy})
