"""A small virtual LAN of Linux network namespaces, so that peers' traffic really crosses network interfaces.

`NetnsLan(k)` builds one namespace per host and one "switch" namespace holding a Linux bridge; each host is
plugged into the bridge by a veth pair (``eth0`` in the host, ``p<i>`` on the switch) and gets the address
``10.A.B.(i+1)/24``. Every interface lives inside a namespace of its own, so the root namespace's network is
never touched and the subnet cannot collide with the machine's (it also avoids the root namespace's subnets,
so that addresses in logs are unambiguous). Names contain the process id and a counter, so concurrent runs
and several LANs in one process never clash; namespaces left behind by a process that died (kill -9) are
removed by the next `create`.

Run a command on host ``i`` with ``[*lan.exec_prefix(i), ...]`` (``ip netns exec <name>``: it execs the
command, so the process id is the command's). ``lan.cut(i)`` pulls host ``i``'s cable out of the switch (its
switch port goes down: no packet in or out, no RST either, exactly like a dead link); ``lan.heal(i)`` plugs it
back. ``lan.counters(i)`` reads the byte counters of the host's ``eth0`` from inside its namespace.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's ``ip``; see :func:`missing_capability`. Use as a
context manager, or call `create` and `close` (close is idempotent and deletes whatever exists).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import subprocess

NAME_PREFIX = "btard"
_STALE = re.compile(rf"^{NAME_PREFIX}-(\d+)-\d+-(?:sw|h\d+)$")
_counter = itertools.count()


def missing_capability() -> str | None:
    """Why namespaces cannot be built here (None: they can): not root, or no ``ip`` command."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN/CAP_SYS_ADMIN for `ip netns`)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is missing"
    return None


def _ip(*args: str) -> str:
    """Run ``ip ARGS``; raise with ip's own message if it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces of earlier LANs whose process is gone; return their names."""
    stale = [n for n in _namespaces() if (m := _STALE.match(n)) and not _alive(int(m.group(1)))]
    for name in stale:
        with contextlib.suppress(RuntimeError):  # someone else removed it meanwhile
            _ip("netns", "delete", name)
    return stale


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A 10.A.B.0/24 derived from ``seed`` that overlaps none of the root namespace's addresses or routes."""
    used = []
    for line in _ip("-4", "-o", "addr", "show").splitlines() + _ip("-4", "route", "show").splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(word, strict=False))
    for k in range(256 * 100):
        a, b = 100 + (seed // 256 + k // 256) % 100, (seed + k) % 256
        net = ipaddress.IPv4Network(f"10.{a}.{b}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class NetnsLan:
    """``hosts`` namespaces on one bridge (in a "switch" namespace), one veth pair each; see the module doc."""

    def __init__(self, hosts: int, *, iface: str = "eth0") -> None:
        if not 1 <= hosts <= 250:
            raise ValueError("hosts must be in 1..250")
        self.hosts = hosts
        self.iface = iface
        self.tag = f"{NAME_PREFIX}-{os.getpid()}-{next(_counter)}"
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.subnet: ipaddress.IPv4Network | None = None
        self._created: list[str] = []

    def __enter__(self) -> NetnsLan:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ setup and teardown
    def create(self) -> NetnsLan:
        """Build the switch and the hosts (on failure, remove what was built and raise)."""
        sweep_stale()
        self.subnet = _free_subnet(os.getpid())
        try:
            self._add_netns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "stp_state", "0")
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                self._add_netns(name)
                port = self.port(i)
                # Created inside the switch namespace, its peer end moved straight into the host's: no name
                # ever appears in the root namespace.
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", self.iface,
                    "netns", name)  # fmt: skip
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                cidr = f"{self.address(i)}/{self.subnet.prefixlen}"
                _ip("-n", name, "addr", "add", cidr, "dev", self.iface)
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "set", self.iface, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def close(self) -> None:
        """Delete every namespace of this LAN (their veths and the bridge go with them). Processes still
        running inside keep their namespace alive until they exit: stop them first."""
        errors = []
        for name in reversed(self._created):
            try:
                _ip("netns", "delete", name)
            except RuntimeError as e:
                if name in _namespaces():
                    errors.append(str(e))
        self._created.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    # ------------------------------------------------------------------ addressing and use
    def address(self, host: int) -> str:
        """Host ``host``'s IPv4 address."""
        assert self.subnet is not None, "create() first"
        return str(self.subnet.network_address + host + 1)

    def port(self, host: int) -> str:
        """The switch-side end of host ``host``'s veth pair (in the switch namespace)."""
        return f"p{host}"

    def exec_prefix(self, host: int) -> list[str]:
        """Prefix of a command line that runs the command in host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.names[host]]

    def run(self, host: int, *cmd: str) -> str:
        """Run a short command in host ``host``'s namespace; its stdout."""
        return subprocess.run(
            [*self.exec_prefix(host), *cmd], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def counters(self, host: int, iface: str | None = None) -> dict[str, int]:
        """rx/tx bytes and packets of an interface of host ``host`` (its LAN interface by default), read from
        ``/sys/class/net`` inside the namespace."""
        names = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
        stats = f"/sys/class/net/{iface or self.iface}/statistics"
        values = self.run(host, "cat", *(f"{stats}/{n}" for n in names)).split()
        return dict(zip(names, map(int, values)))

    def cut(self, host: int) -> None:
        """Cut host ``host`` off: its switch port goes down, so nothing reaches it or leaves it."""
        _ip("-n", self.switch, "link", "set", self.port(host), "down")

    def heal(self, host: int) -> None:
        """Plug host ``host`` back in."""
        _ip("-n", self.switch, "link", "set", self.port(host), "up")
