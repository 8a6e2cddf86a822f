"""Package discovery that pyproject.toml cannot express; everything else is in pyproject.toml.

The built-in handlers live in the top-level ``handlers/`` folder and are installed as the package
``servekit_handlers`` (``servekit.handler.BUILTIN_PACKAGE``), beside ``servekit`` and its subpackages.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["servekit", "servekit.*"]), "servekit_handlers"],
    package_dir={"servekit_handlers": "handlers"},
)
