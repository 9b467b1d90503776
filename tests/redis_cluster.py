"""Real Redis Cluster and Redis Sentinel deployments for the tests, on free ports in temp dirs.

``RedisClusterServers``: three (or more) primaries, no replicas, made with ``redis-cli --cluster
create``. ``RedisSentinelServers``: one primary, one replica and one or three Sentinels that fail
over quickly (``down-after-milliseconds`` 1000, ``failover-timeout`` 3000).

Both need ``redis-server`` (and the cluster ``redis-cli``): without them the tests that use these
helpers are skipped, except under CI (``CI=true``), where they fail (see ``redis_server.py``). Every
wait polls a condition against a deadline; ``stop()`` ends every process it started.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from redis.cluster import key_slot

from redis_server import free_port, require_redis_server

__all__ = ["RedisClusterServers", "RedisNode", "RedisSentinelServers", "slot_of", "wait_until"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CLUSTER_TIMEOUT_S = 20.0
HOST = "127.0.0.1"


def slot_of(key: str) -> int:
    """The cluster slot of ``key`` (honouring its ``{hash tag}``)."""
    return int(key_slot(key.encode()))


def wait_until(what: str, probe: Callable[[], bool], *, within: float, interval: float = 0.05) -> None:
    """Poll ``probe`` (errors count as not yet) until it holds; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while True:
        try:
            if probe():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within}s (last error: {last!r})")
        time.sleep(interval)


class RedisNode:
    """One ``redis-server`` process (a data node or a Sentinel) in its own directory."""

    def __init__(self, binary: str, workdir: Path, port: int, args: list[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "stderr.txt", "wb") as stderr:
            self.proc = subprocess.Popen(  # a fixed argv, no shell
                [self.binary, *self.args],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, **kwargs)  # type: ignore[arg-type]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> None:
        def ping() -> bool:
            if not self.alive:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.failure()}")
            with self.client(socket_timeout=1.0) as c:
                return bool(c.ping())

        wait_until(f"redis-server on port {self.port} answering PING", ping, within=START_TIMEOUT_S)

    def failure(self) -> str:
        parts = []
        if self.proc is not None and self.proc.poll() is not None:
            parts.append(f"exit code {self.proc.returncode}")
        for name in ("stderr.txt", "redis.log"):
            with contextlib.suppress(OSError):
                parts.append((self.workdir / name).read_text(errors="replace")[-2000:])
        return "; ".join(p for p in parts if p) or "no output"

    def kill(self) -> None:
        """SIGKILL: the process dies without a word (a crashed host)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _data_args(port: int, workdir: Path) -> list[str]:
    return [
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--maxmemory-policy", "noeviction",
        "--dir", str(workdir),
        "--logfile", str(workdir / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip


class _Deployment:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.nodes: list[RedisNode] = []

    @property
    def root(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=self._prefix)
        return Path(self._tmp.name)

    def _node(
        self,
        binary: str,
        name: str,
        args: Callable[[int, Path], list[str]],
        pick_port: Callable[[], int] = free_port,
    ) -> RedisNode:
        """Start a node on a free port; a port taken between the probe and the bind is retried."""
        error = ""
        for _ in range(3):
            port = pick_port()
            workdir = self.root / f"{name}-{port}"
            node = RedisNode(binary, workdir, port, args(port, workdir))
            node.start()
            try:
                node.wait_ready()
            except RuntimeError as exc:
                error = f"{exc}: {node.failure()}"
                node.stop()
                continue
            self.nodes.append(node)
            return node
        raise RuntimeError(f"could not start {name}: {error}")

    def stop(self) -> None:
        nodes, self.nodes = self.nodes, []
        for node in reversed(nodes):  # Sentinels and replicas before the primaries they watch
            node.stop()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port and free as well."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


class RedisClusterServers(_Deployment):
    """A Redis Cluster of ``primaries`` primaries, each with ``replicas`` replicas, ready
    (``cluster_state:ok`` everywhere)."""

    def __init__(self, primaries: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        super().__init__("budget-cluster-")
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    @property
    def alive(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.alive]

    def start(self) -> RedisClusterServers:
        server = require_redis_server("redis-server")
        cli = require_redis_server("redis-cli")
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self._node(server, "node", self._args, cluster_port)
            argv = [cli, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes)]
            argv += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            created = subprocess.run(  # a fixed argv, no shell
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=CLUSTER_TIMEOUT_S,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({created.returncode}): "
                    f"{created.stdout.decode(errors='replace')[-2000:]}"
                    f"{created.stderr.decode(errors='replace')[-2000:]}"
                )
            self.wait_ok()
            if self.replicas:
                wait_until("replicas in sync", self._replicas_linked, within=CLUSTER_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _args(self, port: int, workdir: Path) -> list[str]:
        return [
            *_data_args(port, workdir),
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    def _replicas_linked(self) -> bool:
        linked = 0
        for node in self.alive:
            with node.client(socket_timeout=1.0) as c:
                info = c.info("replication")
                linked += info.get("role") == "slave" and info.get("master_link_status") == "up"
        return linked == self.primaries * self.replicas

    def wait_ok(self, within: float = CLUSTER_TIMEOUT_S) -> None:
        """Until every live node says ``cluster_state:ok``, knows every node (a dead one too) and
        agrees on the owner of every slot."""

        def ok() -> bool:
            maps = []
            for node in self.alive:
                with node.client(socket_timeout=1.0) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                        return False
                    if f"cluster_known_nodes:{len(self.nodes)}" not in text:
                        return False
                maps.append(self.slot_owners(node))
            return all(m == maps[0] for m in maps)

        wait_until("cluster_state:ok on every node", ok, within=within)

    def primaries_alive(self) -> Iterator[redis.Redis]:
        for node in self.alive:
            with node.client() as c:
                if c.info("replication").get("role") == "master":
                    yield c

    def slot_owners(self, node: RedisNode | None = None) -> list[int]:
        """The port of the primary serving each of the 16384 slots (as ``node`` sees it)."""
        owners = [0] * 16384
        with (node or self.alive[0]).client(socket_timeout=1.0) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                owners[int(start) : int(end) + 1] = [int(primary[1])] * (int(end) - int(start) + 1)
        return owners

    def node_of_slot(self, slot: int) -> RedisNode:
        port = self.slot_owners()[slot]
        return next(n for n in self.nodes if n.port == port)

    def kill_primary_of(self, slot: int) -> RedisNode:
        """SIGKILL the primary serving ``slot``; returns it."""
        node = self.node_of_slot(slot)
        node.kill()
        return node

    def wait_failover(self, slot: int, old: RedisNode, within: float = CLUSTER_TIMEOUT_S) -> RedisNode:
        """Until a replica of ``old`` serves ``slot`` and the cluster is ok again; returns it."""

        def moved() -> bool:
            return self.slot_owners()[slot] != old.port

        wait_until(f"slot {slot} failed over from port {old.port}", moved, within=within)
        self.wait_ok(within)
        return self.node_of_slot(slot)

    def flushall(self) -> None:
        for c in self.primaries_alive():
            c.flushall()

    def script_flush(self) -> None:
        for node in self.alive:
            with node.client() as c:
                c.script_flush()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisSentinelServers(_Deployment):
    """One primary, one replica and ``sentinels`` Sentinels monitoring them as ``service``."""

    def __init__(
        self,
        sentinels: int = 1,
        *,
        service: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__("budget-sentinel-")
        self.sentinel_count = sentinels
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []

    @property
    def url(self) -> str:
        sentinels = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{sentinels}/{self.service}"

    @property
    def quorum(self) -> int:
        return self.sentinel_count // 2 + 1

    def start(self) -> RedisSentinelServers:
        server = require_redis_server("redis-server")
        try:
            # Diskless sync without its default 5 s wait for more replicas to join.
            fast_sync = ["--repl-diskless-sync-delay", "0"]
            primary = self._node(server, "primary", lambda p, d: [*_data_args(p, d), *fast_sync])
            self.data.append(primary)
            follow = ["--replicaof", HOST, str(primary.port)]
            replica = self._node(
                server, "replica", lambda p, d: [*_data_args(p, d), *fast_sync, *follow]
            )
            self.data.append(replica)
            wait_until("replica in sync", lambda: self._linked(replica), within=START_TIMEOUT_S)
            for _ in range(self.sentinel_count):
                self.sentinels.append(self._node(server, "sentinel", self._sentinel_args))
            self.wait_monitoring()
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel_args(self, port: int, workdir: Path) -> list[str]:
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "sentinel.conf"
        primary = self.data[0].port
        conf.write_text(
            f"port {port}\n"
            f"bind {HOST}\n"
            f"dir {workdir}\n"
            f"logfile {workdir / 'redis.log'}\n"
            f"sentinel monitor {self.service} {HOST} {primary} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        return [str(conf), "--sentinel"]

    @staticmethod
    def _linked(replica: RedisNode) -> bool:
        with replica.client(socket_timeout=1.0) as c:
            info = c.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def wait_monitoring(self, within: float = START_TIMEOUT_S) -> None:
        """Until every Sentinel knows the primary, a replica, and the other Sentinels."""

        def ready() -> bool:
            for s in self.sentinels:
                with s.client(socket_timeout=1.0) as c:
                    # Sent as a plain command: what sentinel_master() returns differs between
                    # redis-py versions (6.4 and 7.0 fail to parse it).
                    raw = c.execute_command("SENTINEL", "MASTER", self.service)
                    state = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
                    if state.get("is_sdown") or state.get("is_odown"):
                        return False
                    if int(state.get("num-slaves", 0)) < 1:
                        return False
                    if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                        return False
            return True

        wait_until("sentinels monitoring the primary and its replica", ready, within=within)

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel reports it."""
        with self.sentinels[0].client(socket_timeout=1.0) as c:
            # A plain command, as in wait_monitoring.
            _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.data if n.port == port)

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns its port."""
        port = self.primary_port()
        self.node(port).kill()
        return port

    def wait_failover(self, old_port: int, within: float = 20.0) -> int:
        """Until every Sentinel names a new primary that says it is one; returns its port."""
        new: list[int] = []

        def promoted() -> bool:
            ports = set()
            for s in self.sentinels:
                with s.client(socket_timeout=1.0) as c:
                    # A plain command, as in wait_monitoring.
                    _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                    ports.add(int(port))
            if len(ports) != 1 or old_port in ports:
                return False
            (port,) = ports
            with self.node(port).client(socket_timeout=1.0) as c:
                if c.info("replication").get("role") != "master":
                    return False
            new[:] = [port]
            return True

        wait_until(f"failover away from port {old_port}", promoted, within=within)
        return new[0]

    def flushall(self) -> None:
        with self.node(self.primary_port()).client() as c:
            c.flushall()

    def __enter__(self) -> RedisSentinelServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
