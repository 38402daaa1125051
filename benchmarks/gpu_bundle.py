#!/usr/bin/env python
"""The GPU check's offline bundle: every wheel the check needs that the GPU machine's image lacks
(MLflow and what it pulls in), so that the check installs there without any package index.

    python benchmarks/gpu_bundle.py build [--python-version 3.12] [--dest .whl]   # here, with PyPI
    python3 benchmarks/gpu_bundle.py install [--wheels .whl] [--fallback]          # there, offline
    python benchmarks/gpu_bundle.py rehearsal-env PATH --wheels DIR                # here, with PyPI

`build` resolves the requirements of fedshard (pyproject.toml, at the versions of
.ci/constraints.txt) that the image does not hold (benchmarks/gpu_image.txt) for CPython
--python-version on manylinux x86_64, keeps the packages of that resolution the image does not
hold, adds the wheels fedshard is built with (pyproject's build-system), downloads them, prints
the total size (refused above MAX_MIB: nothing is written) and lists what it bundled and what it
expects the machine to have, also in DEST/BUNDLE.txt (and DEST/bundle.json).

`install` installs fedshard from this working tree (editable) into the environment of the Python
that runs it, with PIP_NO_INDEX=1 and without pip's configuration: what the environment lacks can
come from the bundle alone (also setuptools, to build fedshard in an environment of its own),
and pip's resolver fails, naming it, when the bundle and the environment together miss
something. It then checks pip's report: every package it installed came from the bundle (or is
fedshard, from this tree). With --fallback, a failed resolution installs the bundle without
dependency checks instead, says so and exits UNCHECKED (3): the GPU machine gets one short
chance, and an image package a little older than a bundled one asks for may well do.

`rehearsal-env` makes what gpu_check.sh --dry --offline installs into: PATH-image, a stand-in for
the image (a virtual environment of this Python with the packages the bundle expects, PyTorch at
the image's version, from the index; made once, and checked to hold nothing the image lacks),
and PATH, a fresh environment that sees PATH-image's packages as the GPU machine's python3 sees
its image's. It prints PATH's python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_LIST = REPO / "benchmarks" / "gpu_image.txt"
CONSTRAINTS = REPO / ".ci" / "constraints.txt"
MAX_MIB = 40.0
MANIFEST, MANIFEST_JSON = "BUNDLE.txt", "bundle.json"  # for a reader; for the rehearsal's image
UNCHECKED = 3  # install's exit status when it installed without dependency checks (--fallback)
# The wheels' platform: the GPU machine is x86-64 Linux with a recent glibc; pip matches each tag exactly.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# What the check runs besides fedshard's own requirements: the CUDA tests (pytest, with the timeout
# pyproject.toml sets) and the GPU memory sampled through NVML. The image holds all three.
CHECK_NEEDS = ("pytest>=8", "pytest-timeout>=2.3", "nvidia-ml-py>=12")


class BundleError(RuntimeError):
    """The bundle cannot be built or installed; the message says why."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, str]:
    """The image's packages, canonical name -> the pinned requirement ('torch==2.11.0') or the name."""
    lines = (ln.strip() for ln in IMAGE_LIST.read_text().splitlines())
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    return {canonical(re.split(r"[=<>!~ ]", r, maxsplit=1)[0]): r for r in reqs}


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def fedshard_requirements() -> dict[str, str]:
    """fedshard's requirements (pyproject.toml) and what the check runs besides (CHECK_NEEDS),
    each -> who requires it."""
    return {
        **dict.fromkeys(pyproject()["project"]["dependencies"], "fedshard"),
        **dict.fromkeys(CHECK_NEEDS, "the check"),
    }


def pip(*args: str, env=None, capture=False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        env=env,
        text=True,
        check=False,
        stdout=subprocess.PIPE if capture else None,
    )


def target_options(python_version: str) -> list[str]:
    return [
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *(f"--platform={p}" for p in PLATFORMS),
    ]


# ----------------------------------------------------------------------------- build


def resolve(requirements: list[str], python_version: str) -> list[dict]:
    """pip's resolution of `requirements` for the target Python, in an empty environment, at the
    versions CI tests: the report's install items (name, version, requirements; no wheel fetched)."""
    with tempfile.TemporaryDirectory() as target:
        done = pip(
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            "--target",
            target,
            "-c",
            str(CONSTRAINTS),
            *target_options(python_version),
            *requirements,
            capture=True,
        )
    if done.returncode != 0:
        raise BundleError(f"pip could not resolve {' '.join(requirements)} for Python {python_version}")
    return json.loads(done.stdout)["install"]


def expectations(roots: dict[str, str], bundled: list[dict], python_version: str, image: dict) -> dict[str, list[str]]:
    """Each image package that fedshard, the check or a bundled package requires -> those
    requirements, as 'torch>=2.11 (fedshard)'."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    wanted: dict[str, list[str]] = {}
    sources = [(who, r) for r, who in roots.items()]
    sources += [(i["metadata"]["name"], r) for i in bundled for r in i["metadata"].get("requires_dist") or []]
    for who, text in sources:
        req = Requirement(text)
        if canonical(req.name) in image and (req.marker is None or req.marker.evaluate(env)):
            wanted.setdefault(canonical(req.name), []).append(f"{req.specifier or 'any'} ({who})")
    return dict(sorted(wanted.items()))


def download(items: list[dict], dest: Path, python_version: str) -> list[Path]:
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items]
    if pip("download", "--no-deps", "--quiet", "-d", str(dest), *target_options(python_version), *pins).returncode:
        raise BundleError("pip could not download the bundle's wheels (above)")
    return sorted(dest.glob("*.whl"))


def describe(bundle: dict) -> str:
    """What `build` prints and writes to BUNDLE.txt: the wheels, their size, what the machine must have."""
    lines = [
        f"bundled for CPython {bundle['python_version']}, manylinux x86_64: {len(bundle['wheels'])} wheels, "
        f"{bundle['mib']:.1f} MiB (at most {MAX_MIB:g})"
    ]
    lines += [
        f"  {name}  {mib:.2f} MiB{'  (only to build fedshard)' if name in bundle['build_only'] else ''}"
        for name, mib in bundle["wheels"].items()
    ]
    lines += [
        "expected on the GPU machine (benchmarks/gpu_image.txt lists its image), as required by fedshard, "
        "the check and the bundle:"
    ]
    lines += [f"  {name}: {', '.join(reqs)}" for name, reqs in bundle["expected"].items()]
    return "\n".join(lines) + "\n"


def build(dest: Path, python_version: str) -> str:
    """Write the bundle to `dest` (replacing it) and return its description; nothing is written
    when the bundle is over MAX_MIB or a step fails."""
    from packaging.requirements import Requirement

    image = image_packages()
    roots = fedshard_requirements()
    missing = [r for r in roots if canonical(Requirement(r).name) not in image]
    items = resolve(missing, python_version) if missing else []
    bundled = [i for i in items if canonical(i["metadata"]["name"]) not in image]
    # pip builds fedshard in an environment of its own, from the bundle too: whatever the image's setuptools
    builders = resolve(pyproject()["build-system"]["requires"], python_version)
    build_names = {canonical(i["metadata"]["name"]) for i in builders}
    dest = dest.resolve()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))  # beside dest: renamed into place
    try:
        wheels = download(bundled + builders, tmp, python_version)
        sizes = {w.name: w.stat().st_size / 2**20 for w in wheels}
        bundle = {
            "python_version": python_version,
            "platforms": PLATFORMS,
            "mib": sum(sizes.values()),
            "wheels": sizes,
            "expected": expectations(roots, bundled, python_version, image),
            "build_only": [w.name for w in wheels if canonical(w.name.split("-")[0]) in build_names],
        }
        text = describe(bundle)
        if bundle["mib"] > MAX_MIB:
            raise BundleError(
                f"{text}the bundle is {bundle['mib']:.1f} MiB, over its limit of {MAX_MIB:g} MiB: "
                f"{dest} is left as it was"
            )
        (tmp / MANIFEST).write_text(text)
        (tmp / MANIFEST_JSON).write_text(json.dumps(bundle, indent=1) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return text


# ----------------------------------------------------------------------------- install


def offline_env() -> dict[str, str]:
    """This environment without any pip setting (a find-links or index of this machine's pip
    configuration would be another source), and with every index off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def outside_the_bundle(report: dict, wheels: Path) -> list[str]:
    """The packages pip's report says it installed from anywhere but the bundle or this tree."""
    bundle = wheels.resolve().as_uri() + "/"
    return [
        f"{i['metadata']['name']} from {url}"
        for i in report["install"]
        for url in [i["download_info"]["url"]]
        if not (url.startswith(bundle) or url == REPO.as_uri())
    ]


def install(wheels: Path, fallback: bool = False) -> tuple[list[str], bool]:
    """Install fedshard (editable) with what the environment lacks from `wheels` alone; returns
    what was installed and whether pip checked every dependency. Raises BundleError when that is
    not possible (or, with `fallback`, only when the bundle cannot even be installed without
    dependency checks)."""
    if not (wheels / MANIFEST).is_file():
        raise BundleError(f"no bundle in {wheels}: build it with `bash benchmarks/gpu_check.sh --bundle`")
    env = offline_env()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = pip(
            "install",
            "--no-index",
            "--find-links",
            str(wheels),
            "--no-compile",
            "--quiet",
            "--report",
            str(report),
            "-e",
            str(REPO),
            env=env,
        )
        if done.returncode == 0:
            installed = json.loads(report.read_text())
            stray = outside_the_bundle(installed, wheels)
            if stray:
                raise BundleError("installed from outside the bundle: " + ", ".join(stray))
            return [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installed["install"]], True
    if not fallback:
        raise BundleError(
            f"the environment and the bundle in {wheels} do not hold everything fedshard needs (pip's message above)"
        )
    print("gpu_bundle: installing the bundle without dependency checks instead", file=sys.stderr, flush=True)
    build_only = json.loads((wheels / MANIFEST_JSON).read_text())["build_only"]
    every = [str(w) for w in sorted(wheels.glob("*.whl")) if w.name not in build_only]
    quick = ("install", "--no-index", "--no-deps", "--no-compile", "--quiet")
    if (
        pip(*quick, *every, env=env).returncode
        or pip(*quick, "--find-links", str(wheels), "-e", str(REPO), env=env).returncode
    ):
        raise BundleError("the bundle could not be installed even without dependency checks (above)")
    pip("check", env=env)
    return [Path(w).name for w in every] + ["fedshard (editable)"], False


# ----------------------------------------------------------------------------- the rehearsal's image


def expected_requirements(wheels: Path) -> list[str]:
    """What the bundle expects on the machine, as requirements: the image's pin where gpu_image.txt
    has one (torch==2.11.0), else the name with every specifier asked of it."""
    image = image_packages()
    expected = json.loads((wheels / MANIFEST_JSON).read_text())["expected"]
    specifiers = {
        n: ",".join(r.split(" (")[0] for r in reqs if not r.startswith("any")) for n, reqs in expected.items()
    }
    return [image[n] if "==" in image[n] else n + specifiers[n] for n in expected]


def site_packages(python: Path) -> Path:
    done = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        text=True,
        stdout=subprocess.PIPE,
    )
    return Path(done.stdout.strip())


def layered_env(path: Path, site_dirs: list[Path]) -> Path:
    """A fresh virtual environment of this Python at `path` (replacing one there) that also sees
    the packages of `site_dirs` (a .pth file), pip among them, as the GPU machine's python3 sees
    its image's: an install adds to it only what they lack. Returns its python."""
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    (site_packages(python) / "gpu-image.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    return python


def image_env(path: Path, wheels: Path) -> Path:
    """The rehearsal's stand-in for the image: a virtual environment of this Python with the
    packages the bundle in `wheels` expects, installed from the index as the image was built,
    and nothing the image lacks; made once, then only checked. Returns its site-packages."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *expected_requirements(wheels)], check=False
        )
        if done.returncode:
            shutil.rmtree(path)
            raise BundleError(f"could not install the image's packages into {path} (above)")
    listed = json.loads(
        subprocess.run(
            [str(python), "-m", "pip", "list", "--format", "json"], check=True, text=True, stdout=subprocess.PIPE
        ).stdout
    )
    extra = sorted({canonical(d["name"]) for d in listed} - set(image_packages()))
    if extra:
        raise BundleError(f"{path} holds what the GPU image lacks: {', '.join(extra)}; remove {path} and retry")
    return site_packages(python)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the bundle (needs PyPI)")
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python [3.12]")
    b.add_argument("--dest", type=Path, default=REPO / ".whl")
    i = sub.add_parser("install", help="install fedshard from the bundle alone (no index)")
    i.add_argument("--wheels", type=Path, default=REPO / ".whl")
    i.add_argument("--fallback", action="store_true", help="on a failed resolution, install without dependency checks")
    e = sub.add_parser("rehearsal-env", help="a fresh environment over a stand-in for the GPU image (needs PyPI)")
    e.add_argument("path", type=Path, help="the fresh environment; the image's stand-in is PATH-image")
    e.add_argument("--wheels", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(args.dest, args.python_version) + f"written to {args.dest}")
        elif args.command == "install":
            installed, checked = install(args.wheels, args.fallback)
            print(
                f"gpu_bundle: installed from {args.wheels} alone, no index"
                f"{'' if checked else ', WITHOUT dependency checks'}: {', '.join(installed)}"
            )
            return 0 if checked else UNCHECKED
        else:
            image = image_env(args.path.with_name(args.path.name + "-image"), args.wheels)
            print(layered_env(args.path, [image]))
    except BundleError as exc:
        print(f"gpu_bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
