"""The lab's wire: network namespaces joined by one Linux bridge, with no route out.

Layout of one lab (prefix ``hv1a2b3``)::

    netns hv1a2b3-sw:     bridge hv1a2b3br (no address, IPv6 off, ARP off)
                            ├─ port hv1a2b3h0 ── veth ── eth0 in netns hv1a2b3-host1   (192.0.2.11/24)
                            ├─ port hv1a2b3h1 ── veth ── eth0 in netns hv1a2b3-host2   (192.0.2.12/24)
                            └─ port hv1a2b3k2 ── veth ── hv1a2b3c2 in the root namespace (capture port:
                                                           no address, ARP off, IPv6 off)

The bridge lives in its own namespace, so the host's firewall, ``br_netfilter`` and forwarding settings never see
lab traffic; only capture ports reach into the root namespace, and those have no address and answer nothing.
No namespace has a default route; forwarding is off everywhere the lab creates.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tests.lab import icmp
from tests.lab.names import (
    check_lab_address,
    check_lab_subnet,
    check_mac,
    check_name,
    check_prefix,
    default_mac,
    ifname,
    new_prefix,
)
from tests.lab.proc import LabCommandError, ProcessRegistry, run

log = logging.getLogger(__name__)

_FileArg = int | IO[Any] | None

# Sysctls applied in every namespace the lab creates, before any interface is added to it: IPv6 off keeps the
# wire quiet (no link-local addresses, DAD, router or MLD solicitations); forwarding off because new namespaces
# may inherit the host's IPv4 forwarding setting.
_NETNS_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
    "net.ipv4.ip_forward=0",
)


def ip_cmd(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n NETNS] ARGS...``."""
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return run(argv, check=check)


def list_netns() -> list[str]:
    """Names of all named network namespaces on the machine."""
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    if not out:
        return []
    return [str(entry["name"]) for entry in json.loads(out)]


def list_links(netns: str | None = None) -> list[str]:
    """Interface names in ``netns`` (the root namespace when None)."""
    out = ip_cmd("-j", "link", "show", netns=netns).stdout.strip()
    return [str(entry["ifname"]) for entry in json.loads(out or "[]")]


def leftovers(prefix: str) -> list[str]:
    """The lab ``prefix``'s namespaces (``<prefix>-*``) and root-namespace links (``<prefix><role><n>``) that
    exist on the machine: what a torn-down lab must not leave."""
    link_re = re.compile(rf"^{re.escape(prefix)}[a-z][0-9]+$")
    found = [f"netns {n}" for n in list_netns() if n.startswith(f"{prefix}-")]
    found += [f"link {n}" for n in list_links() if link_re.match(n)]
    return found


class LabUnsupported(RuntimeError):
    """The running kernel lacks a feature the requested lab setup needs."""


def _disable_ipv6_root(iface: str) -> None:
    """IPv6 off on a root-namespace interface we created, before it goes up (no link-local, no MLD/RS/DAD)."""
    ip_cmd("link", "set", "dev", iface, "addrgenmode", "none")
    with open(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6", "w", encoding="ascii") as fh:
        fh.write("1\n")


class Namespace:
    """A network namespace created by a lab: run commands in it, start tracked processes in it."""

    def __init__(self, name: str, netns: str, registry: ProcessRegistry) -> None:
        self.name = name
        self.netns = netns
        self._registry = registry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, netns={self.netns!r})"

    def run(self, *argv: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace (``ip netns exec``)."""
        return run(["ip", "netns", "exec", self.netns, *argv], check=check, timeout=timeout)

    def popen(
        self,
        *argv: str,
        stdin: _FileArg = subprocess.DEVNULL,
        stdout: _FileArg = None,
        stderr: _FileArg = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a command inside the namespace in a new session (its own process group).

        The lab tracks it and ends its whole process group at teardown.
        """
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self._registry.add(proc)
        return proc

    def iproute(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n NETNS ARGS...``."""
        return ip_cmd(*args, netns=self.netns, check=check)

    def addresses(self, dev: str | None = None) -> list[ipaddress.IPv4Interface]:
        """IPv4 addresses (with prefix length) on ``dev``, or on every interface of the namespace."""
        args = ["-j", "-4", "addr", "show"] + (["dev", dev] if dev else [])
        out = self.iproute(*args).stdout.strip()
        result: list[ipaddress.IPv4Interface] = []
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    result.append(ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
        return result

    def default_routes(self) -> list[str]:
        """Default routes (IPv4 and IPv6) in the namespace; a lab namespace has none."""
        routes = self.iproute("-4", "route", "show", "default").stdout.splitlines()
        routes += self.iproute("-6", "route", "show", "default", check=False).stdout.splitlines()
        return [r for r in routes if r.strip()]


class LabHost(Namespace):
    """A server on the lab wire: one namespace with ``eth0`` (optionally ``eth0.<vlan>``) carrying ``ip``."""

    def __init__(
        self,
        *,
        name: str,
        netns: str,
        ip: ipaddress.IPv4Interface,
        mac: str,
        port: str,
        vlan: int | None,
        registry: ProcessRegistry,
    ) -> None:
        super().__init__(name, netns, registry)
        self.interface = ip
        self.ip = str(ip.ip)
        self.prefixlen = ip.network.prefixlen
        self.mac = mac
        self.link = "eth0"  # the veth end (what link_down takes down)
        self.vlan = vlan
        self.iface = f"eth0.{vlan}" if vlan is not None else "eth0"  # the interface carrying the address
        self.port = port  # the bridge port (in the switch namespace) this host is plugged into

    def __repr__(self) -> str:
        return f"LabHost(name={self.name!r}, netns={self.netns!r}, ip={self.ip!r}, mac={self.mac!r})"

    def link_down(self) -> None:
        """Take the host's ``eth0`` down (as a failed NIC would be); a VLAN sub-interface goes down with it."""
        self.iproute("link", "set", "dev", self.link, "down")

    def link_up(self) -> None:
        self.iproute("link", "set", "dev", self.link, "up")
        if self.vlan is not None:
            self.iproute("link", "set", "dev", self.iface, "up")

    def has_address(self, ip: str) -> bool:
        """True while ``ip`` is configured on the host's address-carrying interface."""
        want = ipaddress.IPv4Address(ip)
        return any(addr.ip == want for addr in self.addresses(self.iface))

    def add_address(self, ip: str) -> None:
        """Add ``ip`` (with the host's prefix length) to its interface, as keepalived adds a VIP."""
        addr = check_lab_address(ip)
        self.iproute("addr", "add", f"{addr}/{self.prefixlen}", "dev", self.iface)

    def del_address(self, ip: str) -> None:
        addr = check_lab_address(ip)
        self.iproute("addr", "del", f"{addr}/{self.prefixlen}", "dev", self.iface)

    def ping(self, ip: str, count: int = 1, timeout: float = 1.0) -> list[float]:
        """ICMP echo from this host to ``ip`` (a lab address); returns the round-trip times in seconds.

        Raises :class:`LabCommandError` unless every echo is answered within ``timeout`` seconds.
        """
        addr = check_lab_address(ip)
        proc = self.run(
            sys.executable, icmp.__file__, str(addr), str(count), f"{timeout:g}", timeout=count * timeout + 5
        )
        return [float(line) / 1000 for line in proc.stdout.split()]

    def arping(
        self,
        ip: str,
        count: int = 1,
        reply: bool = False,
        *,
        vlan: int | None = None,
        interval: float = 0.05,
        timeout: float = 20.0,
    ) -> None:
        """Send ``count`` gratuitous ARPs for ``ip`` from this host: sender IP == target IP == ``ip``, broadcast.

        ``reply=False`` sends ARP requests (op 1, like keepalived), ``reply=True`` ARP replies (op 2). ``vlan``
        adds an 802.1Q tag in user space (``arping -V``; works without kernel VLAN support), sent on ``eth0``.
        Uses the machine's arping (Thomas Habets' arping 2.x: ``-U`` unsolicited, ``-P`` reply opcode, ``-i``
        interface, ``-W`` interval); the sender MAC is the host's. Bounded by ``timeout`` seconds.
        """
        addr = check_lab_address(ip)
        if count < 1:
            raise ValueError("count must be >= 1")
        iface = self.iface if vlan is None else self.link
        argv = ["arping", "-q", "-U", "-i", iface, "-S", str(addr), "-c", str(count), "-W", f"{interval:g}"]
        if reply:
            argv.append("-P")
        if vlan is not None:
            if not 1 <= vlan <= 4094:
                raise ValueError(f"VLAN id {vlan} out of range 1-4094")
            argv += ["-V", str(vlan)]
        argv.append(str(addr))
        # arping exits 1 when nobody answers, which is normal for gratuitous ARP: judge by stderr instead.
        proc = self.run(*argv, check=False, timeout=timeout)
        if proc.returncode not in (0, 1) or proc.stderr.strip():
            raise LabCommandError(argv, proc.returncode, proc.stdout, proc.stderr)


class CaptureNamespace(Namespace):
    """A namespace with one bridge port (``iface``, no address, ARP off) where a watcher can open its socket."""

    def __init__(self, *, name: str, netns: str, port: str, registry: ProcessRegistry) -> None:
        super().__init__(name, netns, registry)
        self.iface = "eth0"
        self.port = port


@dataclass(frozen=True)
class CapturePort:
    """A capture port whose far end is in the root namespace."""

    name: str
    iface: str  # root-namespace interface name
    port: str  # bridge port in the switch namespace


class Lab:
    """A closed layer-2 lab: namespaces on one bridge. Use as a context manager; :meth:`close` tears it down."""

    def __init__(
        self,
        subnet: str = "192.0.2.0/24",
        prefix: str | None = None,
        *,
        workdir: Path | None = None,
        hub: bool = False,
    ) -> None:
        """``hub=True`` makes the bridge flood every frame to every port (no MAC learning), so capture ports also
        see unicast traffic such as ARP replies; by default they see broadcasts and unknown unicast only."""
        self.network = check_lab_subnet(subnet)
        self._auto_prefix = prefix is None
        self._set_prefix(prefix if prefix is not None else new_prefix())
        self.hub = hub
        self.hosts: dict[str, LabHost] = {}
        self.capture_namespaces: dict[str, CaptureNamespace] = {}
        self.capture_ports: dict[str, CapturePort] = {}
        self.processes = ProcessRegistry()
        self._given_workdir = workdir
        self._workdir: Path | None = workdir
        self._netns: list[str] = []  # created by us, in creation order
        self._root_links: list[str] = []
        self._port_index = 0
        self._vlan_ok: bool | None = None
        self._open = False
        self._closed = False

    def _set_prefix(self, prefix: str) -> None:
        self.prefix = check_prefix(prefix)
        self.switch_netns = f"{self.prefix}-sw"
        self.bridge = f"{self.prefix}br"

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, subnet={str(self.network)!r}, hosts={list(self.hosts)})"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create the switch namespace and its bridge. On failure everything created so far is removed."""
        if self._closed:
            raise RuntimeError("a closed lab cannot be reopened; create a new Lab")
        if self._open:
            return
        # A random prefix that some other lab already uses (or left behind) is replaced, never shared.
        for _ in range(10):
            if not self._auto_prefix or not leftovers(self.prefix):
                break
            self._set_prefix(new_prefix())
        self._open = True
        atexit.register(self.close)
        try:
            self._add_netns(self.switch_netns)
            sw = self.switch_netns
            ip_cmd(
                "link", "add", self.bridge, "type", "bridge",
                "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0",
                netns=sw,
            )  # fmt: skip
            ip_cmd("link", "set", "dev", self.bridge, "arp", "off", "up", netns=sw)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Tear everything down: processes (by process group), root-side links, namespaces, the temporary
        workdir. Idempotent and best effort: logs problems, never raises."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.processes.stop_all()
        except Exception:
            log.exception("lab %s: stopping processes failed", self.prefix)
        for link in reversed(self._root_links):
            self._best_effort(["ip", "link", "del", "dev", link], ignore="Cannot find device")
        for netns in reversed(self._netns):
            self._best_effort(["ip", "netns", "delete", netns], ignore="No such file")
        if self._given_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _best_effort(self, argv: list[str], ignore: str) -> None:
        try:
            proc = run(argv, check=False)
            if proc.returncode != 0 and ignore not in proc.stderr:
                log.warning("lab %s: %s failed: %s", self.prefix, " ".join(argv), proc.stderr.strip())
        except Exception:
            log.exception("lab %s: %s failed", self.prefix, " ".join(argv))

    @property
    def workdir(self) -> Path:
        """A directory for config files and logs (a temporary one, removed at close, unless given)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        return self._workdir

    def _require_open(self) -> None:
        if not self._open or self._closed:
            raise RuntimeError("the lab is not open (use it as a context manager)")

    def _add_netns(self, netns: str) -> None:
        ip_cmd("netns", "add", netns)
        self._netns.append(netns)
        run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *_NETNS_SYSCTLS])
        ip_cmd("link", "set", "dev", "lo", "up", netns=netns)

    def _next_index(self) -> int:
        index = self._port_index
        self._port_index += 1
        return index

    def _plug(self, port: str, netns: str, mac: str | None = None) -> None:
        """A veth pair: ``port`` on the bridge, ``eth0`` in ``netns`` (with ``mac`` if given)."""
        peer = ["peer", "name", "eth0"] + (["address", mac] if mac else []) + ["netns", netns]
        ip_cmd("link", "add", port, "type", "veth", *peer, netns=self.switch_netns)
        self._attach(port)

    def _attach(self, port: str) -> None:
        """Enslave ``port`` to the bridge and bring it up; in hub mode the port learns no MACs, so every
        unicast frame is unknown and flooded to all ports."""
        ip_cmd("link", "set", "dev", port, "master", self.bridge, netns=self.switch_netns)
        if self.hub:
            ip_cmd("link", "set", "dev", port, "type", "bridge_slave", "learning", "off", netns=self.switch_netns)
        ip_cmd("link", "set", "dev", port, "up", netns=self.switch_netns)

    # -- building --------------------------------------------------------------------------------------------

    def add_host(self, name: str, ip: str, mac: str | None = None, vlan: int | None = None) -> LabHost:
        """Plug a server into the bridge: netns ``<prefix>-<name>``, ``eth0`` with ``mac`` (default
        ``02:00:<ip octets>``) carrying ``ip/<subnet prefixlen>`` — on ``eth0.<vlan>`` (802.1Q) if ``vlan``."""
        self._require_open()
        check_name(name)
        if name in self.hosts or name in self.capture_namespaces:
            raise ValueError(f"lab already has a namespace named {name!r}")
        addr = check_lab_address(ip)
        if addr not in self.network or addr in (self.network.network_address, self.network.broadcast_address):
            raise ValueError(f"{addr} is not a host address of the lab subnet {self.network}")
        if any(h.ip == str(addr) for h in self.hosts.values()):
            raise ValueError(f"{addr} is already used by another lab host")
        host_mac = check_mac(mac) if mac is not None else default_mac(addr)
        if any(h.mac == host_mac for h in self.hosts.values()):
            raise ValueError(f"MAC {host_mac} is already used by another lab host; pass mac=")
        if vlan is not None:
            if not 1 <= vlan <= 4094:
                raise ValueError(f"VLAN id {vlan} out of range 1-4094")
            if not self.vlan_supported():
                raise LabUnsupported(
                    "this kernel cannot create 802.1Q interfaces (CONFIG_VLAN_8021Q); put tagged frames on the "
                    "wire with LabHost.arping(..., vlan=N) instead"
                )

        netns = f"{self.prefix}-{name}"
        port = ifname(self.prefix, "h", self._next_index())
        self._add_netns(netns)
        self._plug(port, netns, host_mac)
        iface = "eth0"
        ip_cmd("link", "set", "dev", "eth0", "up", netns=netns)
        if vlan is not None:
            iface = f"eth0.{vlan}"
            ip_cmd("link", "add", "link", "eth0", "name", iface, "type", "vlan", "id", str(vlan), netns=netns)
            ip_cmd("link", "set", "dev", iface, "up", netns=netns)
        interface = ipaddress.IPv4Interface(f"{addr}/{self.network.prefixlen}")
        ip_cmd("addr", "add", str(interface), "dev", iface, netns=netns)
        host = LabHost(
            name=name, netns=netns, ip=interface, mac=host_mac, port=port, vlan=vlan, registry=self.processes
        )
        self.hosts[name] = host
        return host

    def vlan_supported(self) -> bool:
        """Whether the kernel can create 802.1Q sub-interfaces (probed once, in the switch namespace)."""
        self._require_open()
        if self._vlan_ok is None:
            probe = ifname(self.prefix, "v", 0)
            args = ["link", "add", "link", self.bridge, "name", probe, "type", "vlan", "id", "1"]
            created = ip_cmd(*args, netns=self.switch_netns, check=False)
            self._vlan_ok = created.returncode == 0
            if self._vlan_ok:
                ip_cmd("link", "del", "dev", probe, netns=self.switch_netns, check=False)
        return self._vlan_ok

    def load_switch_ruleset(self, script: str, what: str) -> None:
        """Load an nftables script into the switch namespace (a ``bridge`` table seeing every frame the lab's
        bridge forwards; the host's ruleset is never touched, and the table ends with the namespace)."""
        self._require_open()
        if shutil.which("nft") is None:
            raise LabUnsupported(f"{what} needs nft (Debian package nftables; scripts/setup.sh installs it)")
        argv = ["ip", "netns", "exec", self.switch_netns, "nft", "-f", "-"]
        loaded = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=10, check=False)
        if loaded.returncode != 0:
            raise LabCommandError(argv, loaded.returncode, loaded.stdout, loaded.stderr)

    def add_capture_port(self, name: str = "cap") -> str:
        """A bridge port whose other end stays in the root namespace: up, ``arp off``, IPv6 off, no address.

        A raw AF_PACKET socket (or tcpdump) on it sees the lab's broadcasts while the host answers nothing.
        Returns the root-namespace interface name.
        """
        self._require_open()
        check_name(name)
        if name in self.capture_ports:
            raise ValueError(f"lab already has a capture port named {name!r}")
        index = self._next_index()
        iface = ifname(self.prefix, "c", index)
        port = ifname(self.prefix, "k", index)
        ip_cmd("link", "add", iface, "type", "veth", "peer", "name", port, "netns", self.switch_netns)
        self._root_links.append(iface)
        _disable_ipv6_root(iface)
        ip_cmd("link", "set", "dev", iface, "arp", "off", "up")
        self._attach(port)
        self.capture_ports[name] = CapturePort(name=name, iface=iface, port=port)
        return iface

    def add_capture_namespace(self, name: str = "capns") -> CaptureNamespace:
        """A namespace ``<prefix>-<name>`` with one bridge port ``eth0`` (up, ``arp off``, no address), for a
        watcher that opens its socket inside the lab (``setns`` into ``/var/run/netns/<netns>``)."""
        self._require_open()
        check_name(name)
        if name in self.hosts or name in self.capture_namespaces:
            raise ValueError(f"lab already has a namespace named {name!r}")
        netns = f"{self.prefix}-{name}"
        port = ifname(self.prefix, "h", self._next_index())
        self._add_netns(netns)
        self._plug(port, netns)
        ip_cmd("link", "set", "dev", "eth0", "arp", "off", "up", netns=netns)
        ns = CaptureNamespace(name=name, netns=netns, port=port, registry=self.processes)
        self.capture_namespaces[name] = ns
        return ns

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this lab created (the switch namespace included)."""
        return list(self._netns)

    @property
    def root_links(self) -> list[str]:
        """Interfaces this lab created in the root namespace (capture ports)."""
        return list(self._root_links)
