"""Where the ranks meet: the rendezvous address (MASTER_ADDR) rank 0 publishes and the interface gloo binds,
chosen so that every node can reach them. Pure functions; seesaw_ds/distributed/env.py supplies the facts
(environment, host name, interfaces, a resolver) and exports the result.

``socket.gethostbyname(hostname)`` is not enough: Debian-style hosts map their own name to 127.0.1.1 in
/etc/hosts, and a job whose other nodes are told to connect there hangs. MASTER_ADDR must be an address of
rank 0's host (rank 0 serves torch's TCPStore); the first of these that applies is taken:

1. ``launch.master_addr``; 2. an exported ``MASTER_ADDR``; 3. every rank on one host: 127.0.0.1;
4. a name of rank 0's node — Slurm's ``SLURMD_NODENAME`` (under ``srun`` with the default block
   distribution, the first host of the allocation), then the host name — that resolves to a non-loopback
   address; 5. an address of one of this host's interfaces: the one on the subnet of the other nodes
   (resolved from Slurm's node list, ``node[01-03,07]`` expanded here, and the ranks' host names), else the
   first one that is up and not virtual (docker0, veth...); 6. the host name itself (other nodes may resolve
   it), reported as a guess.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Callable, Iterable, Mapping

LOOPBACK = "127.0.0.1"
#: Interfaces that do not reach other nodes: container bridges, virtual pairs, tunnels.
VIRTUAL_PREFIXES = ("docker", "virbr", "veth", "br-", "lxc", "lxd", "cni", "flannel", "cali", "vxlan",
                    "tun", "tap", "kube", "podman", "vnet", "ifb", "dummy")
#: Other hosts resolved to find the cluster's subnet (a few are enough; DNS can be slow on big jobs).
MAX_PEERS = 4

#: name -> [(IPv4 address, netmask)] of the interfaces that are up.
Interfaces = Mapping[str, list[tuple[str, str]]]
Resolver = Callable[[str], list[str]]


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03,07],gpu-a[1-2]-b[3,4]``) as host names, in order;
    zero padding is kept. ValueError on a list this parser does not understand."""
    hosts: list[str] = []
    for entry in _split_top_level(text.strip()):
        hosts.extend(_expand_entry(entry))
    return hosts


def _split_top_level(text: str) -> list[str]:
    entries, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    entries.append(current)
    return [entry.strip() for entry in entries if entry.strip()]


def _expand_entry(entry: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", entry)
    if match is None:
        if "[" in entry or "]" in entry:
            raise ValueError(f"bad host list entry {entry!r}")
        return [entry]
    head, tail = entry[:match.start()], entry[match.end():]
    names = []
    for item in match.group(1).split(","):
        low, _, high = item.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in host list entry {entry!r}")
        width = len(low) if low.startswith("0") else 0
        for number in range(int(low), int(high or low) + 1):
            names.append(f"{head}{number:0{width}d}")
    return [name + rest for name in names for rest in _expand_entry(tail)] if tail else names


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _usable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def _is_virtual(name: str) -> bool:
    return name == "lo" or name.startswith(VIRTUAL_PREFIXES)


def interface_for(address: str, interfaces: Interfaces) -> str | None:
    """The interface whose subnet holds ``address`` (a usable interface of this host), or None."""
    try:
        target = ipaddress.ip_address(address)
    except ValueError:
        return None
    for name, entries in interfaces.items():
        for own, netmask in entries:
            if not _usable(own):
                continue
            try:
                if target in ipaddress.ip_network(f"{own}/{netmask}", strict=False):
                    return name
            except ValueError:
                continue
    return None


def pick_interface_address(interfaces: Interfaces, peers: Iterable[str] = ()) -> str | None:
    """This host's address for other nodes: on a peer's subnet if any, else the first usable address of a
    non-virtual interface, else of any; None when the host has only loopback."""
    for peer in peers:
        name = interface_for(peer, interfaces)
        if name is not None:
            return next(own for own, _ in interfaces[name] if _usable(own))
    ranked = sorted(interfaces.items(), key=lambda item: _is_virtual(item[0]))  # stable: keeps the host's order
    for _, entries in ranked:
        for own, _ in entries:
            if _usable(own):
                return own
    return None


def slurm_hosts(environ: Mapping[str, str], expand: Callable[[str], list[str]] = expand_hostlist) -> list[str]:
    """The hosts of this Slurm step (or job) in order; [] outside Slurm or when the list cannot be read."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(key):
            try:
                return expand(environ[key])
            except ValueError:
                return []
    return []


def choose_master_addr(*, configured: str | None, environ: Mapping[str, str], num_hosts: int, hostname: str,
                       interfaces: Interfaces, resolve: Resolver, peer_hosts: Iterable[str] = (),
                       expand: Callable[[str], list[str]] = expand_hostlist) -> tuple[str, str]:
    """Rank 0's rendezvous address and why it was chosen (see the module's list). ``peer_hosts``: host names
    of the other ranks; ``resolve(name)``: its IPv4 addresses ([] when it does not resolve)."""
    if configured:
        return configured, "launch.master_addr"
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"], "MASTER_ADDR from the environment"
    if num_hosts <= 1:
        return LOOPBACK, "every rank on one host"
    own_names = [name for name in (environ.get("SLURMD_NODENAME"), hostname) if name]
    for name in dict.fromkeys(own_names):
        usable = [address for address in resolve(name) if _usable(address)]
        if usable:
            return usable[0], f"{name} resolves to it"
    others = [host for host in dict.fromkeys([*slurm_hosts(environ, expand), *peer_hosts])
              if host not in own_names][:MAX_PEERS]
    peers = [address for host in others for address in resolve(host) if _usable(address)]
    address = pick_interface_address(interfaces, peers)
    if address is not None:
        why = ("on the other nodes' subnet" if any(interface_for(peer, interfaces) for peer in peers)
               else "the first usable one")
        return address, f"{hostname} does not resolve to a routable address; this host's interface ({why})"
    return hostname, "no routable address found: the host name, for the other nodes to resolve"


def gloo_interface(*, environ: Mapping[str, str], num_hosts: int, hostname: str, master_addr: str,
                   interfaces: Interfaces, resolve: Resolver) -> str | None:
    """GLOO_SOCKET_IFNAME to export, or None to leave gloo alone. gloo binds the address its host name
    resolves to: on a multi-host job where that is loopback (Debian's 127.0.1.1) no other node reaches it;
    then bind the interface on the rendezvous address's subnet. A user's GLOO_SOCKET_IFNAME wins."""
    if num_hosts <= 1 or environ.get("GLOO_SOCKET_IFNAME"):
        return None
    own = resolve(hostname)
    if own and not all(is_loopback(address) for address in own):
        return None
    targets = [master_addr] if _usable(master_addr) else [a for a in resolve(master_addr) if _usable(a)]
    for target in targets:
        name = interface_for(target, interfaces)
        if name is not None:
            return name
    return None
