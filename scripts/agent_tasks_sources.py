"""The source trees scripts/agent_tasks.py's code questions are drawn from: a repository-like copy of an installed
package, a package downloaded once from a registry (Debian, npm, PyPI) and unpacked, or one npm bundles."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def copy_package(src: Path, dest_root: Path, suffixes: tuple[str, ...]) -> Path:
    """A repository-like copy of a source tree: dest_root/<src's name>/... with the files of these suffixes."""
    for p in src.rglob("*"):
        if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts:
            q = dest_root / src.name / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, q)
    return dest_root


def fetched_dir(source: str, folder: str, downloads: Path) -> tuple[Path, str]:
    """A source tree from a registry, downloaded once into `downloads` and unpacked there: deb:PACKAGE (apt-get
    download, dpkg-deb -x), jdk:PACKAGE (a Debian package holding the JDK's src.zip), npm:NAME@VERSION (npm
    pack) or pypi:NAME==VERSION (its source distribution: pip download); with the package file it came from (its
    version in the name). `folder` may end in a glob (a crate's
    versioned directory)."""
    kind, name = source.split(":", 1)
    dest = downloads / name.replace("@", "-").replace("==", "-")
    if not dest.is_dir():
        downloads.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=downloads))
        try:
            if kind in ("deb", "jdk"):
                _fetch(["apt-get", "download", name], tmp)
                (deb,) = tmp.glob("*.deb")
                _fetch(["dpkg-deb", "-x", str(deb), str(tmp / "x")], tmp)
                if kind == "jdk":
                    (src_zip,) = (tmp / "x").rglob("src.zip")
                    with zipfile.ZipFile(src_zip) as z:
                        z.extractall(tmp / "x", [m for m in z.namelist() if m.startswith("java.base/")])
            else:
                if kind == "pypi":
                    _fetch([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", str(tmp), name], tmp)  # fmt: skip
                else:
                    _fetch(["npm", "pack", name, "--pack-destination", str(tmp)], tmp)
                (tgz,) = [p for p in tmp.iterdir() if p.name.endswith((".tgz", ".tar.gz"))]
                with tarfile.open(tgz) as t:
                    t.extractall(tmp / "x", filter="data")
            ((tmp / "x") / ".fetched").write_text(next(p.name for p in tmp.iterdir() if p.is_file()) + "\n")
            (tmp / "x").rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = sorted(dest.glob(folder))
    if not found:
        raise SystemExit(f"{source} has no folder {folder!r} (in {dest})")
    return found[-1], (dest / ".fetched").read_text().strip()


def _fetch(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise SystemExit(f"{cmd[0]} is not installed here: the {cmd[-1]} set is fetched with it")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {why[0]}")


def npm_package_dir(name: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not installed here: the JavaScript sets are read from the packages it bundles")
    path = Path(npm).resolve().parent.parent / "node_modules" / name
    if not path.is_dir():
        raise SystemExit(f"npm bundles no package {name!r} here ({path})")
    return path
