"""The GPU check's offline install (benchmarks/gpu_bundle.py install), the step the GPU machine and
its rehearsal (`gpu_check.sh --dry --offline`) run before the check: fedshard from this working
tree, and what the environment lacks from the bundle alone, every index off.

What this checks: with this machine's pip configuration dropped (its find-links would be another
source) and PIP_NO_INDEX=1, the bundle built for this Python, added to an environment that holds
the GPU image's packages but not MLflow, installs fedshard; pip's report names nothing installed
from anywhere else; MLflow then imports from that environment; a bundle one wheel short fails,
naming it, so no other source can fill a gap (and the GPU machine's fallback then installs it
without dependency checks, saying so). What it does not: the image here is this environment's
own packages of benchmarks/gpu_image.txt (its PyTorch, not the GPU's 2.11), linked into place;
the rehearsal installs the image's PyTorch 2.11 itself (docs/gpu.md).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow  # every test here starts processes

sys.path.append(str(REPO / "benchmarks"))
gpu_bundle = importlib.import_module("gpu_bundle")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The bundle for this Python, built once per test session from PyPI (about 35 MiB)."""
    dest = tmp_path_factory.mktemp("bundle") / "wheels"
    gpu_bundle.build(dest, f"{sys.version_info.major}.{sys.version_info.minor}")
    return dest


def link_image_packages(farm: Path) -> None:
    """This environment's distributions that the GPU image holds, linked into `farm`: their
    modules and their metadata, and nothing of the others (MLflow, what only it pulls in)."""
    image = gpu_bundle.image_packages()
    for dist in importlib.metadata.distributions():
        if gpu_bundle.canonical(dist.metadata["Name"] or "") not in image:
            continue
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] != ".."}:
            source, link = Path(dist.locate_file(top)), farm / top
            if source.exists() and not link.exists():
                link.symlink_to(source)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    farm = tmp_path_factory.mktemp("image")
    link_image_packages(farm)
    assert (farm / "torch").exists() and not (farm / "mlflow").exists()
    return farm


def install(python: Path, wheels: Path, *options: str) -> subprocess.CompletedProcess:
    """The install step exactly as gpu_check.sh runs it, here with this machine's pip settings in
    the environment (gpu_bundle drops them)."""
    return subprocess.run(
        [str(python), str(REPO / "benchmarks" / "gpu_bundle.py"), "install", "--wheels", str(wheels), *options],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=240,
    )


def one_wheel_short(bundle: Path, where: Path) -> Path:
    """The bundle without SQLAlchemy, which MLflow's store needs."""
    where.mkdir()
    for wheel in bundle.iterdir():
        if not wheel.name.lower().startswith("sqlalchemy-"):
            (where / wheel.name).symlink_to(wheel)
    return where


def test_the_bundle_alone_installs_fedshard_beside_the_image_without_any_index(bundle, image, tmp_path):
    python = gpu_bundle.layered_env(tmp_path / "env", [image])
    done = install(python, bundle)
    assert done.returncode == 0, done.stdout
    pinned = dict(line.split("==") for line in (REPO / ".ci" / "constraints.txt").read_text().split() if "==" in line)
    assert f"mlflow=={pinned['mlflow']}" in done.stdout and "fedshard==" in done.stdout
    where = subprocess.run(
        [str(python), "-c", "import mlflow, fedshard; print(mlflow.__file__, fedshard.__file__)"],
        text=True,
        stdout=subprocess.PIPE,
        check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(tmp_path / "env") and Path(where[1]).is_relative_to(REPO / "src")


def test_a_bundle_one_wheel_short_fails_naming_it_and_the_gpu_machine_falls_back(bundle, image, tmp_path):
    """Without SQLAlchemy, which MLflow's store needs, pip has nowhere else to look: the install
    fails, naming it. On the GPU machine (--fallback) the bundle then installs without dependency
    checks, with exit status 3 and pip check's complaint, rather than losing the one chance."""
    python = gpu_bundle.layered_env(tmp_path / "env", [image])
    done = install(python, one_wheel_short(bundle, tmp_path / "short"), "--fallback")
    assert done.returncode == gpu_bundle.UNCHECKED, done.stdout
    assert "no matching distribution found for sqlalchemy" in done.stdout.lower(), done.stdout
    assert "WITHOUT dependency checks" in done.stdout and "requires sqlalchemy" in done.stdout.lower()


def test_the_bundle_lists_what_it_holds_and_what_it_expects_of_the_image(bundle):
    """Only what the image lacks, and setuptools to build fedshard (pip builds it in an environment
    of its own, whatever setuptools the image has); the listing names each wheel and what the
    image must hold."""
    listing = (bundle / gpu_bundle.MANIFEST).read_text()
    wheels = sorted(w.name for w in bundle.glob("*.whl"))
    assert all(f"  {w}  " in listing for w in wheels)
    in_image = [w for w in wheels if gpu_bundle.canonical(w.split("-")[0]) in gpu_bundle.image_packages()]
    assert [w.split("-")[0] for w in in_image] == ["setuptools"]
    assert f"  {in_image[0]}  " in listing and "(only to build fedshard)" in listing
    assert "  torch: >=2.11 (fedshard)" in listing and "  pytest: >=8 (the check)" in listing
    mib = sum(w.stat().st_size for w in bundle.glob("*.whl")) / 2**20
    assert f"{len(wheels)} wheels, {mib:.1f} MiB (at most 40)" in listing
