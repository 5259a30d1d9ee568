"""Which TCP addresses a command and every process it starts (Ray's GCS, raylet, workers, agents, torch's store)
listen on while it runs: ``ss -ltnp`` polled, its sockets kept when their process descends from the command."""
from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_PID = re.compile(r"pid=(\d+)")


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    return parents


def _descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        pid = parents.get(pid, 0)
        if pid <= 1:
            return False
    return False


@dataclass
class Watched:
    returncode: int
    output: str
    sockets: set[tuple[str, int, str]] = field(default_factory=set)  # (address, port, process name)

    def exposed(self) -> set[tuple[str, int, str]]:
        """The sockets outside 127.0.0.0/8 and ::1."""
        return {s for s in self.sockets if not _loopback(s[0])}


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _listening(root: int) -> set[tuple[str, int, str]]:
    table = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10).stdout
    parents = _parents()
    found = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        address, _, port = fields[3].rpartition(":")
        for pid in map(int, _PID.findall(line)):
            if _descends(pid, root, parents):
                name = re.search(r'\(\("([^"]+)"', line)
                found.add(("0.0.0.0" if address == "*" else "::" if address == "[::]" else address, int(port),
                           name.group(1) if name else "?"))
    return found


def run_watched(command: list[str], *, env: dict[str, str], cwd: str | Path, timeout: float,
                every: float = 0.3) -> Watched:
    """Run ``command`` (bounded by ``timeout`` seconds), listing its process tree's listening sockets meanwhile."""
    log = Path(cwd) / f".watched-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sockets: set[tuple[str, int, str]] = set()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            sockets |= _listening(proc.pid)
            time.sleep(every)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(30)
            raise AssertionError(f"{command} ran past {timeout:g} s:\n{log.read_text()[-4000:]}")
    output = log.read_text()
    log.unlink()
    return Watched(proc.returncode, output, sockets)


def listening_addresses(port: int) -> list[str]:
    """The addresses (hex, as the kernel's tables write them: 127.0.0.1 is ``0100007F``) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                    found.append(address)
    return found
