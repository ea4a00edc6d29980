"""keepalived in a lab host: config rendering (like the classic HAVIP example) and process control.

One :class:`Keepalived` per host. It runs as ``ip netns exec NS keepalived -n -l -D -f CONF -p PID -r VRRP_PID``
(own pid files per instance) in its own process group, so stopping or killing it reaches the VRRP child too.
"""

from __future__ import annotations

import ipaddress
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from tests import service_logs
from tests.lab.names import check_lab_address
from tests.lab.netns import LabHost
from tests.lab.proc import group_members, pid_alive, signal_group, terminate_group
from tests.waiting import eventually_sync

State = Literal["MASTER", "BACKUP"]


def render_config(
    *,
    router_id: str,
    iface: str,
    src_ip: str,
    peers: Sequence[str],
    vip: str,
    prefixlen: int,
    priority: int,
    state: State = "BACKUP",
    vrid: int = 51,
    advert_int: float = 1,
    garp_master_delay: int = 1,
    garp_master_refresh: int = 5,
    garp_master_repeat: int = 5,
    nopreempt: bool = False,
    auth_pass: str | None = None,
    extra_vips: Sequence[str] = (),
) -> str:
    """A keepalived.conf for one VRRP instance over unicast, in the shape of the HAVIP example.

    ``extra_vips`` go to ``virtual_ipaddress_excluded`` (not carried in adverts, so any number of them; keepalived
    adds them and sends GARPs for them like for the VIP).
    """
    if not 1 <= vrid <= 255:
        raise ValueError(f"virtual_router_id {vrid} out of range 1-255")
    if not 1 <= priority <= 255:
        raise ValueError(f"priority {priority} out of range 1-255")
    if state not in ("MASTER", "BACKUP"):
        raise ValueError(f"state must be MASTER or BACKUP, not {state!r}")
    if nopreempt and state != "BACKUP":
        raise ValueError("nopreempt needs state BACKUP")
    if auth_pass is not None and not 1 <= len(auth_pass) <= 8:
        raise ValueError("auth_pass must be 1-8 characters")
    if advert_int <= 0:
        raise ValueError("advert_int must be positive")
    # VRRPv2 adverts carry whole seconds; sub-second intervals need VRRPv3 (which has no authentication).
    fractional = advert_int != int(advert_int)
    if fractional and auth_pass is not None:
        raise ValueError("a fractional advert_int needs VRRPv3, which has no authentication")

    lines = [
        "! rendered by tests.lab.keepalived",
        "global_defs {",
        f"    router_id {router_id}",
        "    vrrp_skip_check_adv_addr",
        "    vrrp_garp_interval 0",
        "    vrrp_gna_interval 0",
        "}",
        "",
        f"vrrp_instance VI_{vrid} {{",
        f"    state {state}",
        f"    interface {iface}",
        f"    virtual_router_id {vrid}",
        f"    priority {priority}",
        f"    advert_int {advert_int:g}",
    ]
    if fractional:
        lines.append("    version 3")
    if nopreempt:
        lines.append("    nopreempt")
    if auth_pass is not None:
        lines += ["    authentication {", "        auth_type PASS", f"        auth_pass {auth_pass}", "    }"]
    lines.append(f"    unicast_src_ip {check_lab_address(src_ip)}")
    lines.append("    unicast_peer {")
    lines += [f"        {check_lab_address(peer)}" for peer in peers]
    lines.append("    }")
    lines += ["    virtual_ipaddress {", f"        {check_lab_address(vip)}/{prefixlen} dev {iface}", "    }"]
    if extra_vips:
        lines.append("    virtual_ipaddress_excluded {")
        lines += [f"        {check_lab_address(extra)}/{prefixlen} dev {iface}" for extra in extra_vips]
        lines.append("    }")
    lines += [
        f"    garp_master_delay {garp_master_delay}",
        f"    garp_master_repeat {garp_master_repeat}",
        f"    garp_master_refresh {garp_master_refresh}",
        "}",
        "",
    ]
    return "\n".join(lines)


class Keepalived:
    """One keepalived instance on a lab host (unicast VRRP with ``peers``, one VIP on the host's interface)."""

    def __init__(
        self,
        host: LabHost,
        *,
        vip: str,
        peers: list[str],
        priority: int,
        state: State = "BACKUP",
        vrid: int = 51,
        advert_int: float = 1,
        garp_master_delay: int = 1,
        garp_master_refresh: int = 5,
        garp_master_repeat: int = 5,
        nopreempt: bool = False,
        auth_pass: str | None = None,
        extra_vips: Sequence[str] = (),
        workdir: Path,
    ) -> None:
        self.host = host
        self.vip = str(check_lab_address(vip))
        if ipaddress.IPv4Address(self.vip) not in host.interface.network:
            raise ValueError(f"VIP {self.vip} is not in {host.name}'s subnet {host.interface.network}")
        self.peers = list(peers)
        self.priority = priority
        self.state = state
        self.vrid = vrid
        self.extra_vips = [str(check_lab_address(v)) for v in extra_vips]
        self.config = render_config(
            router_id=f"{host.netns}",
            iface=host.iface,
            src_ip=host.ip,
            peers=self.peers,
            vip=self.vip,
            prefixlen=host.prefixlen,
            priority=priority,
            state=state,
            vrid=vrid,
            advert_int=advert_int,
            garp_master_delay=garp_master_delay,
            garp_master_refresh=garp_master_refresh,
            garp_master_repeat=garp_master_repeat,
            nopreempt=nopreempt,
            auth_pass=auth_pass,
            extra_vips=self.extra_vips,
        )
        self.workdir = Path(workdir) / f"keepalived-{host.name}"
        self.conf_path = self.workdir / "keepalived.conf"
        self.pid_path = self.workdir / "keepalived.pid"
        self.vrrp_pid_path = self.workdir / "vrrp.pid"
        self.log_path = self.workdir / "keepalived.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Keepalived(host={self.host.name!r}, vip={self.vip!r}, priority={self.priority}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The keepalived parent's PID (also its process-group id), once started."""
        return self.proc.pid if self.proc is not None else None

    def start(self, *, timeout: float = 20.0) -> None:
        """Write the config and start keepalived; wait (bounded) until its VRRP child has written its pid file."""
        if self.proc is not None:
            raise RuntimeError(f"keepalived on {self.host.name} was already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.pid_path, self.vrrp_pid_path):
            stale.unlink(missing_ok=True)
        self.conf_path.write_text(self.config, encoding="ascii")
        argv = [
            "keepalived", "-n", "-l", "-D",
            "-f", str(self.conf_path), "-p", str(self.pid_path), "-r", str(self.vrrp_pid_path),
        ]  # fmt: skip
        service_logs.follow(f"keepalived on {self.host.name}", self.log_path, per_test=True)
        with open(self.log_path, "ab") as log:
            self.proc = self.host.popen(*argv, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def vrrp_running() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"keepalived on {self.host.name} exited with {proc.returncode}:\n{self.log_tail()}"
                )
            return self.vrrp_pid() is not None

        eventually_sync(vrrp_running, timeout=timeout, what=f"keepalived's VRRP child on {self.host.name}")

    def vrrp_pid(self) -> int | None:
        """The VRRP child's PID from its pid file, or None."""
        try:
            return int(self.vrrp_pid_path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """Every PID this instance ever had: the parent and the VRRP child (for liveness checks after stop)."""
        found = [p for p in (self.pid, self.vrrp_pid()) if p is not None]
        return found

    def running(self) -> bool:
        """True while any process of this keepalived instance (its process group) is alive."""
        return self.proc is not None and bool(group_members(self.proc.pid))

    def alive_pids(self) -> list[int]:
        return [p for p in self.pids() if pid_alive(p)]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the process group (keepalived sends a priority-0 advert and drops the VIP); bounded wait,
        SIGKILL if it lingers."""
        if self.proc is not None:
            terminate_group(self.proc, timeout=timeout)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL to the whole process group (the VRRP child too): no priority-0 advert, the VIP stays."""
        if self.proc is None:
            return
        if group_members(self.proc.pid):
            signal_group(self.proc.pid, signal.SIGKILL)
        terminate_group(self.proc, timeout=timeout, term_first=False)

    def is_master(self) -> bool:
        """True while the VIP is on the host's interface (keepalived adds it as master)."""
        return self.host.has_address(self.vip)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
