"""Local equivalents of the images docker-compose.yml names, for a machine that reaches no registry.

A Debian base made with debootstrap, the stand-ins of tests/deploy/standins built on it, and the project's own
image built from the Dockerfile with wheels made on the host (pip reaches the package index there, not inside a
build). Everything is cached and named by a hash of what goes into it, so that a repeated run builds nothing and
a change rebuilds only what it touches:

    /var/cache/havip-ci/debian-bookworm-<key>.tar     the debootstrapped root filesystem (re-imported if the
                                                      image was removed from podman's storage)
    /var/cache/havip-ci/wheels-<key>/                 wheels of requirements.lock's runtime dependencies
    localhost/havip-ci/<name>:<key>                   images in podman's storage

Only names under localhost/havip-ci/ and files under the cache directory are ever created or removed here.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.podman import PodmanError, podman

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
CACHE_DIR = Path(os.environ.get("HAVIP_CI_CACHE", "/var/cache/havip-ci"))
REPOSITORY = "localhost/havip-ci"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Part of the base image's key: bump it when the way the base is made changes.
BASE_RECIPE = f"debootstrap --variant=minbase {SUITE}; apt archives removed; v1"
# What the project's image is built from (the Dockerfile copies shared/ and services/ besides the files).
APP_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "requirements.lock")
APP_TREES = ("shared", "services")


@dataclass
class Images:
    """Names of the images to give docker-compose.yml's HAVIP_*_IMAGE variables, and what making them cost."""

    havip: str = ""
    python: str = ""
    postgres: str = ""
    rabbitmq: str = ""
    prometheus: str = ""
    haproxy: str = ""
    pg_auto_failover: str = ""  # the ha profile's Postgres tier (deploy/pg-auto-failover), when asked for
    steps: list[tuple[str, str, float]] = field(default_factory=list)  # (what, "built" | "cached", seconds)


def _digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:12]


def _files_digest(base: Path, paths: Iterable[Path]) -> list[bytes | str]:
    parts: list[bytes | str] = []
    for path in sorted(paths):
        parts += [str(path.relative_to(base)), path.read_bytes()]
    return parts


def _tree(directory: Path) -> Iterator[Path]:
    """The files of a source tree as the Dockerfile's build context sees them (.dockerignore's exclusions)."""
    for path in directory.rglob("*"):
        ignored = "__pycache__" in path.parts or path.suffix == ".pyc" or path.name == "README.md"
        if path.is_file() and not ignored:
            yield path


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    sources = Path("/etc/apt")
    candidates = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            uri = uris.group(1).rstrip("/") if uris else ""
            if suites and SUITE in suites.group(1).split() and uri.endswith("/debian"):
                return uri
        for line in text.splitlines():
            match = re.match(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+{SUITE}\s", line)
            if match:
                return match.group(1)
    return DEFAULT_MIRROR


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def _prune_other_tags(repository: str, keep: str) -> None:
    """Untag earlier versions of one of our own images (in use by a container: left alone)."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repository, check=False).stdout.split()
    for name in listed:
        if name != keep and name.startswith(f"{repository}:"):
            podman("rmi", name, check=False)


@contextmanager
def _cache_lock() -> Iterator[None]:
    """One builder at a time on this machine (two CI runs at once wait for each other's cache)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], timeout: float, cwd: Path | None = None) -> None:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        output = result.stdout[-3000:] + result.stderr[-3000:]
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{output}")


def _timed(images: Images, what: str, cached: bool, started: float) -> None:
    images.steps.append((what, "cached" if cached else "built", time.monotonic() - started))


def ensure_base(images: Images) -> str:
    started = time.monotonic()
    mirror = debian_mirror()
    key = _digest([BASE_RECIPE, mirror])
    name = f"{REPOSITORY}/debian:{SUITE}-{key}"
    if image_exists(name):
        _timed(images, "debian base", True, started)
        return name
    tarball = CACHE_DIR / f"debian-{SUITE}-{key}.tar"
    if not tarball.exists():
        for stale in CACHE_DIR.glob(f"debian-{SUITE}-*.tar"):
            stale.unlink()
        with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            log.info("debootstrap %s from %s", SUITE, mirror)
            _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], timeout=900)
            for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=300)
            partial.rename(tarball)
    podman("import", str(tarball), name, timeout=300)
    _prune_other_tags(f"{REPOSITORY}/debian", name)
    _timed(images, "debian base", False, started)
    return name


def ensure_standin(images: Images, base: str, standin: str, directory: Path | None = None) -> str:
    """The image built from DIRECTORY's Containerfile (a stand-in of tests/deploy/standins by default) on the
    Debian base, named after STANDIN."""
    started = time.monotonic()
    directory = STANDINS / standin if directory is None else directory
    key = _digest([base, *_files_digest(directory, (p for p in directory.iterdir() if p.is_file()))])
    name = f"{REPOSITORY}/{standin}:{key}"
    cached = image_exists(name)
    if not cached:
        podman(
            "build", "--layers=false", "--build-arg", f"BASE={base}",
            "-f", str(directory / "Containerfile"), "-t", name, str(directory),
            timeout=900,
        )  # fmt: skip
        _prune_other_tags(f"{REPOSITORY}/{standin}", name)
    _timed(images, f"{standin} stand-in", cached, started)
    return name


def runtime_requirements() -> list[str]:
    """The project's runtime dependencies as pyproject.toml declares them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"])


def ensure_wheelhouse(images: Images) -> Path:
    """Wheels of the project's runtime dependencies at the versions of requirements.lock, and setuptools (to
    build the project's own wheel in the image), made with the host's pip."""
    started = time.monotonic()
    key = _digest(_files_digest(ROOT, [ROOT / "requirements.lock", ROOT / "pyproject.toml"]))
    wheelhouse = CACHE_DIR / f"wheels-{key}"
    cached = wheelhouse.is_dir()
    if not cached:
        for stale in CACHE_DIR.glob("wheels-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix="partial-wheels-"))
        try:
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
            # The dependencies named, not the project (building it here would leave build/ in the checkout).
            requirements = runtime_requirements()
            lock = str(ROOT / "requirements.lock")
            wheel = [*pip, "wheel", "--wheel-dir", str(partial), "--constraint", lock, *requirements]
            _run(wheel, 900, CACHE_DIR)
            download = [*pip, "download", "--only-binary=:all:", "--dest", str(partial), "setuptools>=68"]
            _run(download, 300, CACHE_DIR)
            partial.rename(wheelhouse)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _timed(images, "wheelhouse", cached, started)
    return wheelhouse


def ensure_app(images: Images, python: str, wheelhouse: Path) -> str:
    started = time.monotonic()
    files = [ROOT / f for f in APP_FILES] + [p for tree in APP_TREES for p in _tree(ROOT / tree)]
    key = _digest([python, wheelhouse.name, *_files_digest(ROOT, files)])
    name = f"{REPOSITORY}/havip:{key}"
    cached = image_exists(name)
    if not cached:
        podman(
            "build", "--layers=false",
            "--build-arg", f"PYTHON_IMAGE={python}",
            "--build-arg", "WHEELHOUSE=/wheelhouse",
            "--volume", f"{wheelhouse}:/wheelhouse:ro",
            "-f", str(ROOT / "Dockerfile"), "-t", name, str(ROOT),
            timeout=900,
        )  # fmt: skip
        _prune_other_tags(f"{REPOSITORY}/havip", name)
    _timed(images, "havip (Dockerfile)", cached, started)
    return name


def ensure_images(ha: bool = False) -> Images:
    """Every image the compose test needs, built only when missing; with `ha`, also the image of the ha profile's
    Postgres tier, from deploy/pg-auto-failover itself (its Containerfile takes the Debian base as BASE, as the
    stand-ins do)."""
    images = Images()
    with _cache_lock():
        base = ensure_base(images)
        images.python = ensure_standin(images, base, "python")
        images.postgres = ensure_standin(images, base, "postgres")
        images.rabbitmq = ensure_standin(images, base, "rabbitmq")
        images.prometheus = ensure_standin(images, base, "prometheus")
        images.haproxy = ensure_standin(images, base, "haproxy")
        if ha:
            images.pg_auto_failover = ensure_standin(
                images, base, "pg-auto-failover", ROOT / "deploy/pg-auto-failover"
            )
        images.havip = ensure_app(images, images.python, ensure_wheelhouse(images))
    return images


if __name__ == "__main__":  # python -m tests.deploy.images [--ha]: build (or find) them, and say what it cost
    logging.basicConfig(level=logging.INFO)
    try:
        made = ensure_images(ha="--ha" in sys.argv[1:])
    except (PodmanError, RuntimeError) as exc:
        sys.exit(str(exc))
    for what, how, seconds in made.steps:
        print(f"{what:<22} {how:<7} {seconds:6.1f} s")
    print(made.havip, made.python, made.postgres, made.rabbitmq, made.prometheus, made.haproxy, sep="\n")
    if made.pg_auto_failover:
        print(made.pg_auto_failover)
