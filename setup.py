"""Package discovery for the remapped folders; pyproject.toml holds everything else.

``kernels/``, ``plugins/`` and ``recipes/`` sit at the top of the repository but install as
``meshforge.kernels``, ``meshforge_plugins`` and ``meshforge.recipes`` (pyproject's package-dir).
setuptools' ``find`` directive cannot search a remapped folder, so the packages are found here,
and a new subpackage can never be left out of a wheel by a hand-written list.
"""

from setuptools import find_packages, setup


def packages_in(folder: str, name: str) -> list[str]:
    return [name, *(f"{name}.{sub}" for sub in find_packages(folder))]


setup(
    packages=[
        *packages_in("meshforge", "meshforge"),
        *packages_in("kernels", "meshforge.kernels"),
        *packages_in("plugins", "meshforge_plugins"),
        "meshforge.recipes",  # data only: the built-in recipes (meshforge.runs.resolve_recipe)
    ]
)
