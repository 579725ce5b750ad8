"""Hosts for tests: Linux network namespaces on a bridge, each with its own address and the names of all of them.

A process started "on" a host (`Hosts.popen`, `Hosts.run`) runs in that host's network namespace: it sees its own
`eth0` and loopback, binds its own ports (two hosts can both serve :6379) and reaches the others by name, as
containers of one compose network do. The names are in `/etc/netns/NS/hosts`, which `ip netns exec` mounts over
`/etc/hosts` for that process; `/etc/netns/NS/resolv.conf` names a resolver that is not there (127.0.0.1), so a
lookup of a name the file lacks (gRPC's c-ares also asks for an IPv6 record) fails at once instead of waiting for
the machine's DNS server, which no host can reach. Each process also gets a UTS namespace named after its host (the
machine's name resolves to the host's address, as in a container), a PID namespace (it sees its host's processes
only), and its host's own folder mounted at `Hosts.tmp` (the same path on every host, other files behind it: Ray
worker nodes put their files in the head's temp dir path, which on machines of their own is their own disk).

The root namespace (this process) has the bridge's first address and reaches every host by address.
`cut(host)` takes a host's link down (a machine that drops off the network) and `restore(host)` brings it back.
Everything made here (namespaces, links, the bridge, /etc/netns entries, processes in the namespaces) is removed
by `down()`, and only that. Needs root (CI runs as root) and `ip` from iproute2.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
NETNS_ETC = Path("/etc/netns")


def unavailable() -> str | None:
    """Why hosts cannot be made here (a reason for pytest.skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root); run the test suite as root to test the cluster"
    if not Path(IP).exists():
        return "`ip` (iproute2) is not installed: apt-get install iproute2"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no address or route of this machine is in."""
    taken = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randint(160, 250)}.{random.randint(0, 255)}.0/24")
        if f"10.{net.network_address.packed[1]}.{net.network_address.packed[2]}." not in taken:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")


@dataclass
class Host:
    name: str
    namespace: str
    link: str  # the root namespace's end of its veth pair: down = cut off
    address: str


class Hosts:
    """Network namespaces on one bridge; see the module docstring."""

    def __init__(self, names: list[str], root: Path, tag: str | None = None):
        self.tag = tag or f"{random.getrandbits(16):04x}"
        self.root = root  # root/NAME/tmp: the host's own temp dir, mounted at self.tmp on that host
        self.tmp = Path(f"/tmp/p2p-{self.tag}")  # short: Ray's unix sockets live under it
        self.bridge = f"p2pbr{self.tag}"
        self.subnet = _free_subnet()
        addresses = list(self.subnet.hosts())
        self.gateway = str(addresses[0])
        self.hosts = {
            name: Host(name, f"p2p-{self.tag}-{name}", f"p2p{self.tag}v{i}", str(addresses[i + 1]))
            for i, name in enumerate(names)
        }
        self._procs: list[subprocess.Popen] = []
        self.made = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def up(self) -> Hosts:
        self.made = True  # from the first command on, down() removes whatever exists
        self.tmp.mkdir()
        for name in self.hosts:
            self.private(name).mkdir(parents=True, exist_ok=True)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        names = "".join(f"{h.address} {h.name}\n" for h in self.hosts.values())
        for h in self.hosts.values():
            _ip("netns", "add", h.namespace)
            _ip("link", "add", h.link, "type", "veth", "peer", "name", "eth0", "netns", h.namespace)
            _ip("link", "set", h.link, "master", self.bridge, "up")
            _ip("-n", h.namespace, "addr", "add", f"{h.address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", h.namespace, "link", "set", "eth0", "up")
            _ip("-n", h.namespace, "link", "set", "lo", "up")
            # a default route, as a container has: programs that find "their" address by routing towards the
            # internet (Ray does) find eth0's; nothing is forwarded (ip_forward is left as it is)
            _ip("-n", h.namespace, "route", "add", "default", "via", self.gateway)
            etc = NETNS_ETC / h.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        return self

    def private(self, host: str) -> Path:
        """The host's own temp dir as this process sees it (on the host: `self.tmp`)."""
        return self.root / host / "tmp"

    def command(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` on `host`: in its network namespace, and namespaces of its own for the rest (module docstring). The
        name matters: Gloo offers its peers the address the machine's name resolves to (127.0.0.1 otherwise)."""
        prelude = 'hostname "$0" && mount --bind "$1" "$2" && shift 2 && exec "$@"'
        own = ["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
        args = [host, str(self.private(host)), str(self.tmp)]
        return [IP, "netns", "exec", self.hosts[host].namespace, *own, "sh", "-c", prelude, *args, *cmd]

    def popen(self, host: str, cmd: list[str], env: dict[str, str], log: Path, user: str | None = None):
        """Start `cmd` on `host` in a session of its own, output to `log`."""
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.command(host, cmd), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._procs.append(proc)
        return proc

    def run(self, host: str, cmd: list[str], env: dict[str, str], timeout: float = 600, **kw):
        """Run `cmd` on `host` to its end; the CompletedProcess (text output captured)."""
        return subprocess.run(
            self.command(host, cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )

    def pids(self, host: str) -> list[int]:
        out = _ip("netns", "pids", self.hosts[host].namespace, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, host: str, sig: int = signal.SIGKILL) -> None:
        """Every process on `host` (in its namespace: all of them ours)."""
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def cut(self, host: str) -> None:
        _ip("link", "set", self.hosts[host].link, "down")

    def restore(self, host: str) -> None:
        _ip("link", "set", self.hosts[host].link, "up")

    def down(self) -> None:
        if not self.made:
            return
        for h in self.hosts.values():
            if Path(f"/run/netns/{h.namespace}").exists():
                self.kill_all(h.name)
        for proc in self._procs:  # reap (a runuser wrapper's child is in the namespace, killed above)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        deadline = time.monotonic() + 10
        for h in self.hosts.values():
            while self.pids(h.name) and time.monotonic() < deadline:
                time.sleep(0.1)
            _ip("link", "del", h.link, check=False)
            _ip("netns", "del", h.namespace, check=False)
            shutil.rmtree(NETNS_ETC / h.namespace, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(OSError):
            self.tmp.rmdir()
        self.made = False
