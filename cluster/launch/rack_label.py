"""Which rack is this machine in? ``python -m cluster.launch.rack_label CLUSTER_YAML`` prints its name.

Ray's on-premise (``local``) cluster launcher has one node type for every machine
and does not pass node-type labels to ``ray start`` (``ray.autoscaler._private.
updater``: "Local NodeProvider doesn't need resource and label override"), so the
``rack`` label cannot come from the launcher. ``cluster/cluster.yaml`` therefore
keeps a rack map next to the machine list::

    provider:
      type: local
      head_ip: 10.0.0.10
      worker_ips: [10.0.0.11, 10.0.1.10]
      racks:                  # tide's: rack name -> the machines in it
        r0: [10.0.0.10, 10.0.0.11]
        r1: [10.0.1.10]

and every node's start command asks this module for its own rack::

    RACK="$(python -m cluster.launch.rack_label ~/tide-cluster.yaml)" && ray start ... --labels="rack=$RACK"

A machine matches a map entry when the entry (an IP address or a host name,
resolved) is one of the machine's interface addresses or its host name. A machine
in no rack, or in two, is an error (exit 2, message on stderr), so that a node
never joins the cluster without its label (placement by ``rack`` would then
silently never use it). So is a rack map that does not list exactly the machines of
``head_ip`` and ``worker_ips``, each once, or that lists a loopback entry
(``localhost``, ``127.0.0.1``, ``::1``: an address of every machine, which would match them all).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

#: names that mean "this machine" wherever they are resolved (RFC 6761 ``localhost``, Debian's IPv6 aliases)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback (or unspecified) address on every machine: ``127.x.x.x``, ``::1``,
    ``0.0.0.0``, ``::``, ``localhost`` (and ``*.localhost``)."""
    import ipaddress

    name = host.strip().lower().rstrip(".")
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def load_rack_map(source: str | Path | dict) -> dict[str, list[str]]:
    """``provider.racks`` of a cluster YAML (path or parsed dict), validated.

    Raises:
        ValueError: no ``provider.racks`` mapping, a rack name that cannot be a Ray label
            value (``cluster.launch.topology.RACK_NAME``), an empty rack, a machine listed twice, a
            loopback entry (``localhost``, ``127.0.0.1``, ``::1``: it would match every machine), or
            a rack map whose machines are not exactly those of ``provider.head_ip`` and
            ``provider.worker_ips`` (the missing and the extra ones are named).
    """
    from cluster.launch.topology import RACK_NAME  # cheap: the start command should not import torch
    from model.safe_io import read_yaml_mapping  # no torch: model/ imports it lazily

    data, where = read_yaml_mapping(source, "cluster config")
    racks = (data.get("provider") or {}).get("racks")
    if not isinstance(racks, dict) or not racks:
        raise ValueError(f"{where}: provider.racks must map rack names to lists of machines (IPs or host names), "
                         f"e.g. {{r0: [10.0.0.10, 10.0.0.11], r1: [10.0.1.10]}}")
    seen: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for rack, hosts in racks.items():
        if not isinstance(rack, str) or not RACK_NAME.fullmatch(rack):
            raise ValueError(f"{where}: rack name {rack!r} cannot be a Ray node label value: use 1-63 letters, "
                             f"digits, '-', '_' or '.', starting and ending with a letter or digit")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h.strip() for h in hosts):
            raise ValueError(f"{where}: provider.racks.{rack} must be a non-empty list of IPs or host names")
        for h in hosts:
            if _is_loopback(h):
                raise ValueError(f"{where}: provider.racks.{rack} lists {h!r}, a loopback address that every "
                                 "machine has (so every machine would match it): list each machine by its "
                                 "network IP or host name, as in provider.head_ip / worker_ips")
            if h in seen:
                raise ValueError(f"{where}: machine {h} is listed in rack {seen[h]} and in rack {rack}")
            seen[h] = rack
        out[rack] = list(hosts)
    provider = data.get("provider") or {}
    head, workers = provider.get("head_ip"), provider.get("worker_ips")
    if not isinstance(head, str) or not head.strip() or not isinstance(workers, list) \
            or not all(isinstance(w, str) for w in workers):
        raise ValueError(f"{where}: provider.head_ip (one IP or host name) and provider.worker_ips (a list of "
                         "them) are needed: provider.racks must list exactly those machines")
    machines = [head, *workers]
    twice = sorted({m for m in machines if machines.count(m) > 1})
    missing = [m for m in machines if m not in seen]
    extra = [h for h in seen if h not in machines]
    if twice or missing or extra:
        why = [f"in no rack: {', '.join(dict.fromkeys(missing))}"] if missing else []
        why += [f"not in provider.head_ip / worker_ips: {', '.join(extra)}"] if extra else []
        why += [f"listed twice in provider.head_ip / worker_ips: {', '.join(twice)}"] if twice else []
        raise ValueError(f"{where}: provider.racks must list each machine of provider.head_ip and "
                         f"provider.worker_ips exactly once; {'; '.join(why)}")
    return out


def local_addresses() -> set[str]:
    """This machine's names and interface addresses (IPv4 and IPv6)."""
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    import importlib

    import ray._private.services

    psutil = importlib.import_module("psutil")  # after `import ray`, which puts its vendored psutil on sys.path

    names.add(ray._private.services.get_node_ip_address())  # the address `ray start` will register
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                names.add(a.address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    return {n for n in names if n}


def _resolve(host: str) -> set[str]:
    """``host`` itself plus the non-loopback addresses it resolves to (a machine's own name often
    resolves to 127.0.1.1 on that machine only: that must not make every name match)."""
    import ipaddress

    found = {host}
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return found
    for info in infos:
        addr = info[4][0].split("%", 1)[0]
        try:
            if not ipaddress.ip_address(addr).is_loopback:
                found.add(addr)
        except ValueError:
            pass
    return found


def rack_of(racks: dict[str, list[str]], addresses: set[str]) -> str:
    """The one rack holding a machine with one of ``addresses``.

    Raises:
        ValueError: the machine is in no rack or in more than one.
    """
    hits = sorted({rack for rack, hosts in racks.items() for h in hosts if _resolve(h) & addresses})
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ValueError(f"this machine ({', '.join(sorted(addresses))}) is in no rack of provider.racks "
                         f"({racks}); add its IP to the rack it sits in")
    raise ValueError(f"this machine ({', '.join(sorted(addresses))}) is listed in several racks: {hits}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.launch.rack_label",
                                description="Print the rack (provider.racks of a Ray cluster YAML) this machine is "
                                            "in, for `ray start --labels rack=...`.")
    p.add_argument("cluster_yaml", help="the cluster YAML (cluster/cluster.yaml, mounted as ~/tide-cluster.yaml)")
    p.add_argument("--address", action="append",
                   help="match this address / host name instead of the machine's own (repeatable)")
    args = p.parse_args(argv)
    try:
        racks = load_rack_map(args.cluster_yaml)
        print(rack_of(racks, set(args.address) if args.address else local_addresses()))
    except ValueError as e:
        print(f"tide rack_label: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
