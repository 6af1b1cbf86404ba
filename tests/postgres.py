"""A real PostgreSQL server for tests: Debian's server binaries (the `postgresql` package; .ci/run installs it where
it is missing), a fresh cluster in a temporary folder on a free localhost port, started once per test session and
stopped at its end; `pg_url` gives each test a database of its own, made empty. Where the server cannot be found the
tests skip, unless DELTAMEM_TEST_POSTGRES=required (.ci/run sets it): then they fail.

initdb and the server refuse to run as root: as root they run as `nobody` (runuser), the cluster's folder made its.
"""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pg_bin() -> Path | None:
    """The folder of the newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/N/bin, else on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(fsync: bool = False) -> Iterator[str]:
    """A PostgreSQL server with its cluster in a new temporary folder (removed after; its own, so that `nobody` can
    enter it), on a free localhost port; yields the URL of its `postgres` database (superuser, trust
    authentication). fsync off for tests; on for benchmarks."""
    bindir = pg_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="deltamem-pg-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        os.chmod(root, 0o755)
        shutil.chown(root, "nobody")
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, cwd=root)
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--no-sync"], **run)  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    opts += " -c fsync=on" if fsync else " -c fsync=off"
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-o", opts, "-l", root / "log", "-w", "-t", "60",
                    "start"], **run)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """A new, empty database on the server; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The URL of a running server's `postgres` database, for the whole test session."""
    required = os.environ.get("DELTAMEM_TEST_POSTGRES") == "required"  # CI's: fail where the server is missing
    missing = pytest.fail if required else pytest.skip
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (the `cluster` extra)")
    if pg_bin() is None:
        missing("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
    with postgres_server() as url:
        yield url


@pytest.fixture()
def pg_url(postgres, request) -> str:
    """A new, empty database for this test (named after it), on the session's server."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50] + os.urandom(3).hex()
    return create_database(postgres, name)
