"""The Binder image, rendered by repo2docker's own code (no Docker needed), installs what the course needs.

A broken binder/ only shows when a learner clicks the badge, minutes into a build; this catches it here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent

# conda-forge name -> PyPI name, for packages whose names differ. None: not a Python package.
CONDA_TO_PYPI = {"python-graphviz": "graphviz", "graphviz": None, "python": None}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(buildpack, Dockerfile text) as repo2docker would build this repository on Binder."""
    app = pytest.importorskip("repo2docker.app", reason="jupyter-repo2docker is not installed "
                                                       "(pip install -e '.[binder]')")
    r2d = app.Repo2Docker()
    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)  # detection and rendering read CWD-relative paths
    try:
        buildpacks = (bp(base_image=r2d.base_image) for bp in r2d.buildpacks)
        bp = next((b for b in buildpacks if b.detect()), None) or r2d.default_buildpack(base_image=r2d.base_image)
        bp.platform = "linux/amd64"
        dockerfile = bp.render(build_args={})
        # properties that read files must be evaluated while CWD is the repository
        facts = {
            "buildpack": type(bp).__name__,
            "binder_dir": bp.binder_dir,
            "python_version": bp.python_version,
            "environment": dict(bp.environment_yaml),
        }
    finally:
        mp.undo()
    return facts, dockerfile


def test_conda_buildpack_from_binder_dir(rendered):
    facts, _ = rendered
    assert facts["buildpack"] == "CondaBuildPack"
    assert facts["binder_dir"] == "binder"


def test_environment_file_is_installed(rendered):
    _, dockerfile = rendered
    assert '--file "binder/environment.yml"' in dockerfile
    # the environment is solved before the repository is copied in, so editing a notebook rebuilds nothing
    assert dockerfile.index('--file "binder/environment.yml"') < dockerfile.index("COPY --chown=1000:1000 src/ ")


def test_postbuild_runs_and_installs_the_package(rendered):
    _, dockerfile = rendered
    assert "RUN ./binder/postBuild" in dockerfile
    script = (REPO / "binder" / "postBuild").read_text()
    assert script.startswith("#!/bin/bash\n")
    assert re.search(r"^set -e", script, re.M), "without set -e a failing step does not fail the build"
    assert re.search(r"^pip install --no-deps -e \.$", script, re.M)


def test_apt_packages_are_installed(rendered):
    _, dockerfile = rendered
    installs = re.findall(r"apt-get install --yes --no-install-recommends ([^&]*)&&", dockerfile)
    wanted = set((REPO / "binder" / "apt.txt").read_text().split())
    assert wanted <= {name for line in installs for name in line.split()}


def test_python_pin_satisfies_requires_python(rendered):
    facts, _ = rendered
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert facts["python_version"] in SpecifierSet(requires)


def _conda_packages(environment: dict) -> dict[str, SpecifierSet | None]:
    """PyPI name -> version constraint, for the Python packages in a conda environment file."""
    packages = {}
    for dep in environment["dependencies"]:
        assert isinstance(dep, str), f"binder/environment.yml: pip section {dep!r}: declare it in conda terms"
        name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", dep.strip()).groups()
        pypi = CONDA_TO_PYPI.get(name, name)
        if pypi is None:
            continue
        if spec.startswith("=") and not spec.startswith("=="):
            spec = f"=={spec[1:]}" + ("" if spec.endswith("*") else ".*")  # conda's "=4" means 4.*
        packages[canonicalize_name(pypi)] = SpecifierSet(spec) if spec else None
    return packages


def _pyproject_requirements() -> tuple[dict[str, Requirement], dict[str, Requirement]]:
    """(what the course needs: dependencies + [course], everything declared in any extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(lines):
        for line in lines:
            req = Requirement(line)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                for extra in req.extras:
                    yield from expand(extras[extra])
            else:
                yield req

    needed = {canonicalize_name(r.name): r for r in expand(project["dependencies"] + extras["course"])}
    declared = {canonicalize_name(r.name): r for extra in extras.values() for r in expand(extra)}
    return needed, {**declared, **needed}


def _compatible(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether some version satisfies both (tried at every version either one names, and just above)."""
    literals = {re.sub(r"\.\*$", "", s.version) for s in (*a, *b)}
    candidates = literals | {v + ".999" for v in literals}
    return any(a.contains(v, prereleases=True) and b.contains(v, prereleases=True) for v in candidates)


def test_environment_matches_pyproject(rendered):
    facts, _ = rendered
    conda = _conda_packages(facts["environment"])
    needed, declared = _pyproject_requirements()
    missing = sorted(set(needed) - set(conda))
    assert not missing, f"pyproject needs {missing} but Binder would not install them"
    undeclared = sorted(set(conda) - set(declared))
    assert not undeclared, f"binder/environment.yml installs {undeclared}, which pyproject does not declare"
    for name, spec in conda.items():
        if spec is not None and declared[name].specifier:
            assert _compatible(spec, declared[name].specifier), \
                f"{name}: environment.yml wants {spec}, pyproject {declared[name].specifier}"


def test_version_pins_are_compared():
    assert _compatible(SpecifierSet("==4.*"), SpecifierSet(">=4,<5"))
    assert not _compatible(SpecifierSet("==4.*"), SpecifierSet(">=5"))
    assert not _compatible(SpecifierSet(">=0.22"), SpecifierSet("<0.20"))


def test_conda_names_map_to_pypi_names():
    env = {"dependencies": ["python=3.11", "python-graphviz>=0.20", "graphviz", "jupyterlab=4", "Dockerfile_Parse"]}
    assert _conda_packages(env) == {
        "graphviz": SpecifierSet(">=0.20"), "jupyterlab": SpecifierSet("==4.*"), "dockerfile-parse": None}


def test_top_level_environment_is_the_binder_one():
    top = REPO / "environment.yml"
    assert top.resolve() == (REPO / "binder" / "environment.yml").resolve(), \
        "keep one environment file: environment.yml must link to binder/environment.yml"
