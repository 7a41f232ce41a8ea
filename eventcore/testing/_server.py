"""Real redis-server processes for tests: free ports, dedicated data dirs, kill and restart;
and local Redis Clusters made of them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .._embedded import find_redis_server
from ..errors import EmbeddedRedisError

__all__ = ["LocalCluster", "RedisServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server child process. ``restart()`` keeps port and data (AOF) so clients can
    reconnect to the same URL; ``kill()`` is SIGKILL, ``stop()`` a clean SHUTDOWN."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        appendonly: bool = True,
        appendfsync: str = "always",
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.binary = binary or os.environ.get("EVENTCORE_TEST_REDIS_SERVER") or find_redis_server()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="eventcore-redis-"))
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return out.split("v=")[1].split()[0] if "v=" in out else out.strip()

    def start(self, timeout: float = 15.0) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--logfile", str(self.dir / "redis.log"), *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise EmbeddedRedisError(f"redis-server exited at start:\n{log}")
            if self.ping():
                return self
            time.sleep(0.01)  # the child has no readiness signal but its port
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False

    def command(self, *args: str, timeout: float = 2.0) -> str:
        """One command on a fresh connection; the reply as text (bulk and simple strings, and
        errors, which start with ``-``). For the fixtures' own bookkeeping, not for tests."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(request.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("connection closed mid-reply")
                data += chunk
                head, _, rest = data.partition(b"\r\n")
                if not _:
                    continue
                if head[:1] in (b"+", b"-", b":"):
                    return (head[1:] if head[:1] != b"-" else head).decode()
                if head[:1] == b"$":
                    size = int(head[1:])
                    if size < 0:
                        return ""
                    if len(rest) >= size + 2:
                        return rest[:size].decode()
                    continue
                raise OSError(f"unexpected reply {head[:40]!r}")

    def stop(self) -> None:
        """Clean shutdown: the AOF is flushed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: whatever the AOF fsync policy had not written is lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, hard: bool = False) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


class LocalCluster:
    """A Redis Cluster of local redis-server processes: ``masters`` masters with ``replicas``
    replicas each, on free ports, every node in a data dir of its own (AOF, fsync always), the
    16384 slots spread evenly by ``redis-cli --cluster create``.

    ``start()`` returns once every node reports ``cluster_state:ok``, knows every other node and
    agrees on who serves each slot (and, with replicas, once every replica is in sync), so the
    first command of a test never meets a half-formed cluster. ``cleanup()`` (also the context
    manager's exit) kills every process and removes every data dir, whatever state they are in.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        binary: str | None = None,
        node_timeout_ms: int = 5000,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters_count = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            port, bus = _cluster_ports()
            node = RedisServer(binary, port=port, extra=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # a test may stop a master with no replica: the other masters keep serving
                # their own slots meanwhile
                "--cluster-require-full-coverage", "no",
            ))
            if not node.version.startswith(("6.", "5.")):  # cluster-port is 7.0+; before it
                node.extra += ("--cluster-port", str(bus))  # the bus is port + 10000
            self.nodes.append(node)

    @property
    def url(self) -> str:
        """A URL of one node: what a user sets as ``EVENTCORE_REDIS_URL``."""
        return self.nodes[0].url.removesuffix("/0")

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
            cli = _redis_cli(self.nodes[0].binary)
            created = subprocess.run(
                [cli, "--cluster", "create", *self.addresses,
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            )
            if created.returncode != 0:
                raise EmbeddedRedisError(
                    f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}"
                    f"{created.stderr[-2000:]}")
            self.wait_ok(timeout, meet=True)
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_ok(self, timeout: float = 60.0, *, nodes: list[RedisServer] | None = None,
                meet: bool = False) -> None:
        """Wait until every node (of ``nodes``, default all) says ``cluster_state:ok``, knows
        all the others, and all agree on the slot owners; with replicas, until each master
        has its replicas connected. ``meet``: a node that does not know them all yet is
        introduced to them again every 2 s (a handshake that timed out, on a loaded machine,
        is dropped by the server and never tried again)."""
        deadline = time.monotonic() + timeout
        introduced = time.monotonic()
        last = ""
        while True:
            try:
                last = self._not_ready(nodes if nodes is not None else self.nodes)
                if meet and "nodes" in last and time.monotonic() - introduced > 2.0:
                    introduced = time.monotonic()
                    self._meet_all()
            except OSError as exc:
                last = f"a node did not answer: {exc}"
            if not last:
                return
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"cluster not ready after {timeout}s: {last}")
            time.sleep(0.05)  # polling: a cluster has no readiness signal but its CLUSTER INFO

    def _meet_all(self) -> None:
        """Every node that does not know every other is asked to meet them all (a node it
        knows already is recognised by its id at the handshake and kept once)."""
        for node in self.nodes:
            info = _fields(node.command("CLUSTER", "INFO"))
            if int(info.get("cluster_known_nodes", 0)) == len(self.nodes):
                continue
            for other in self.nodes:
                if other is not node:
                    node.command("CLUSTER", "MEET", "127.0.0.1", str(other.port))

    def _not_ready(self, nodes: list[RedisServer]) -> str:
        views = set()
        for node in nodes:
            info = _fields(node.command("CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return f"127.0.0.1:{node.port} cluster_state:{info.get('cluster_state')}"
            if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return f"127.0.0.1:{node.port} knows {info.get('cluster_known_nodes')} nodes"
            if int(info.get("cluster_slots_assigned", 0)) != 16384:
                return f"127.0.0.1:{node.port} has {info.get('cluster_slots_assigned')} slots"
            views.add(tuple(sorted(self._slot_owners(node))))
        if len(views) > 1:
            return "the nodes disagree on the slot owners"
        if self.replicas:
            for node in nodes:
                repl = _fields(node.command("INFO", "replication"))
                if repl.get("role") == "master" and repl.get("connected_slaves") != str(
                        self.replicas):
                    return f"127.0.0.1:{node.port} has {repl.get('connected_slaves')} replicas"
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return f"replica 127.0.0.1:{node.port} link {repl.get('master_link_status')}"
        return ""

    @staticmethod
    def _slot_owners(node: RedisServer) -> list[tuple[str, str]]:
        """(port of a master, its slot ranges) as ``node`` sees them."""
        out = []
        for line in node.command("CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) >= 8 and "master" in parts[2].split(",") and parts[8:]:
                out.append((parts[1].split("@")[0], " ".join(parts[8:])))
        return out

    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now (after a failover, not the ones created as such)."""
        out = []
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                if _fields(node.command("INFO", "replication")).get("role") == "master":
                    out.append(node)
        return out

    def node_of_slot(self, slot: int) -> RedisServer:
        """The master serving ``slot`` (as the first live node sees it)."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            for port, ranges in self._slot_owners(node):
                for part in ranges.split():
                    if part.startswith("["):
                        continue  # a slot being migrated or imported
                    low, _, high = part.partition("-")
                    if int(low) <= slot <= int(high or low):
                        return next(n for n in self.nodes if f"127.0.0.1:{n.port}" == port
                                    or port.endswith(f":{n.port}"))
            break
        raise LookupError(f"no live node knows who serves slot {slot}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A replica of ``master`` (the cluster was made with replicas), as the master's own
        replication info names it: the cluster bus may not have gossiped the pairing yet."""
        repl = _fields(master.command("INFO", "replication"))
        for key, value in repl.items():
            if key.startswith("slave") and key[5:].isdigit():
                attrs = dict(kv.partition("=")[::2] for kv in value.split(","))
                port = int(attrs.get("port", 0))
                found = [n for n in self.nodes if n.port == port]
                if found:
                    return found[0]
        raise LookupError(f"127.0.0.1:{master.port} has no replica")

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Wait until every live replica has everything its master has written so far (so a
        failover loses nothing that was acknowledged before this call)."""
        deadline = time.monotonic() + timeout
        for master in self.masters():
            target = int(_fields(master.command("INFO", "replication"))["master_repl_offset"])
            while True:
                repl = _fields(master.command("INFO", "replication"))
                offsets = [int(_fields(v.replace(",", "\n").replace("=", ":"))["offset"])
                           for k, v in repl.items() if k.startswith("slave")]
                if len(offsets) >= self.replicas and all(o >= target for o in offsets):
                    break
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"replicas of 127.0.0.1:{master.port} not in sync after {timeout}s")
                time.sleep(0.02)  # polling: replication offsets have no notification

    def promote(self, replica: RedisServer, timeout: float = 60.0) -> None:
        """A graceful failover (``CLUSTER FAILOVER``): ``replica`` catches up with its master
        and takes over its slots; returns once every live node sees it serve them.

        The server aborts a manual failover that does not complete within 5 s (its master
        slow to pause its clients, the replica slow to catch up: a loaded machine), saying
        nothing; then it is asked again.
        """
        port = f":{replica.port}"
        deadline = time.monotonic() + timeout
        while True:
            replica.command("CLUSTER", "FAILOVER")
            asked = time.monotonic()
            while time.monotonic() - asked < 6.0:  # the server gives up after 5 s
                live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
                with contextlib.suppress(OSError):
                    if all(any(owner.endswith(port) for owner, _ in self._slot_owners(n))
                           for n in live):
                        return
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"127.0.0.1:{replica.port} not promoted after {timeout}s")
                time.sleep(0.05)  # polling: a failover has no notification but CLUSTER NODES

    def move_slot(self, slot: int, to: RedisServer, *, batch: int = 10) -> int:
        """Migrate ``slot`` to the master ``to`` as ``redis-cli --cluster reshard`` does (mark
        it importing and migrating, MIGRATE its keys ``batch`` at a time, then hand it over),
        while clients go on: they meet ASK and TRYAGAIN meanwhile. Returns the keys moved."""
        import redis  # the synchronous client: fixture bookkeeping runs in a thread

        source = self.node_of_slot(slot)
        if source is to:
            return 0

        def client(node: RedisServer) -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True)

        def run(c: redis.Redis, *args: Any) -> Any:
            return c.execute_command(*args)  # type: ignore[no-untyped-call]

        src, dst = client(source), client(to)
        moved = 0
        try:
            src_id, dst_id = run(src, "CLUSTER MYID"), run(dst, "CLUSTER MYID")
            run(dst, "CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            run(src, "CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := run(src, "CLUSTER GETKEYSINSLOT", slot, batch):
                run(src, "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for node in self.masters():
                with client(node) as c:
                    run(c, "CLUSTER SETSLOT", slot, "NODE", dst_id)
        finally:
            src.close()
            dst.close()
        return moved

    def keyslot(self, key: str) -> int:
        live = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        return int(live.command("CLUSTER", "KEYSLOT", key))

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def _cluster_ports() -> tuple[int, int]:
    """A free port whose cluster bus port (port + 10000, Redis before 7.0) is free too."""
    while True:
        port = free_port()
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port, port + 10000


def _fields(text: str) -> dict[str, str]:
    """``key:value`` lines (INFO, CLUSTER INFO) as a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key] = value
    return out


def _redis_cli(server_binary: str) -> str:
    """The redis-cli next to ``server_binary``, else the one on PATH."""
    beside = Path(server_binary).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise EmbeddedRedisError("redis-cli is needed to create a cluster and is not on PATH")
    return found
