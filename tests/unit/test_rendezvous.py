"""Rendezvous address, gloo interface and device choice against made-up host tables (pure): a Debian-style
host whose name resolves to 127.0.1.1, hosts with several interfaces, Slurm node lists, posed nodes."""
from __future__ import annotations

import pytest

from seesaw_ds.distributed.env import device_index
from seesaw_ds.distributed.rendezvous import (LOOPBACK, choose_master_addr, expand_hostlist, gloo_interface,
                                              pick_interface_address)

#: A GPU node: a container bridge listed first, Ethernet, InfiniBand (IPoIB).
NODE01_INTERFACES = {
    "lo": [("127.0.0.1", "255.0.0.0")],
    "docker0": [("172.17.0.1", "255.255.0.0")],
    "eth0": [("10.1.0.11", "255.255.0.0")],
    "ib0": [("192.168.10.11", "255.255.255.0")],
}


def resolver(table: dict[str, list[str]]):
    return lambda name: list(table.get(name, []))


def choose(environ=None, *, num_hosts=2, hostname="node01", interfaces=NODE01_INTERFACES, table=None,
           peers=(), configured=None):
    return choose_master_addr(configured=configured, environ=environ or {}, num_hosts=num_hosts,
                              hostname=hostname, interfaces=interfaces, resolve=resolver(table or {}),
                              peer_hosts=peers)


# -- Slurm host lists -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("gpu-a[1-2]-b[3,4]", ["gpu-a1-b3", "gpu-a1-b4", "gpu-a2-b3", "gpu-a2-b4"]),
    ("login,node[1-2],cpu7", ["login", "node1", "node2", "cpu7"]),
    ("single", ["single"]),
])
def test_slurm_host_lists_expand(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[1-3", "node1-3]", "node[a-b]", "node[1-x]"])
def test_malformed_host_lists_are_refused(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


# -- MASTER_ADDR ------------------------------------------------------------------------------------------------
def test_configured_then_exported_then_loopback_on_one_host():
    assert choose({"MASTER_ADDR": "10.9.9.9"}, configured="10.0.0.5")[0] == "10.0.0.5"
    assert choose({"MASTER_ADDR": "10.9.9.9"})[0] == "10.9.9.9"
    assert choose(num_hosts=1, table={"node01": ["10.1.0.11"]})[0] == LOOPBACK


def test_a_name_that_resolves_to_a_routable_address_is_used():
    addr, why = choose(table={"node01": ["10.1.0.11"]})
    assert addr == "10.1.0.11" and "node01" in why


def test_debian_host_never_publishes_127_0_1_1():
    """node01's /etc/hosts says 127.0.1.1 node01; node02 resolves to its InfiniBand address: the address
    on the other nodes' subnet is chosen (not docker0's, not loopback)."""
    table = {"node01": ["127.0.1.1"], "node02": ["192.168.10.12"]}
    addr, why = choose(table=table, peers=["node02"])
    assert addr == "192.168.10.11"
    assert "subnet" in why


def test_debian_host_without_resolvable_peers_takes_the_first_physical_interface():
    addr, _ = choose(table={"node01": ["127.0.1.1"]})
    assert addr == "10.1.0.11"  # docker0 comes first in the table but is a bridge


def test_slurm_node_name_of_rank_0_resolves():
    environ = {"SLURM_JOB_NODELIST": "node[01-02]", "SLURMD_NODENAME": "node01"}
    assert choose(environ, hostname="node01.cluster", table={"node01": ["10.1.0.11"]})[0] == "10.1.0.11"


def test_slurm_node_list_gives_the_peers_on_a_debian_host():
    environ = {"SLURM_JOB_NODELIST": "node[01-03]", "SLURM_STEP_NODELIST": "node[01,03]",
               "SLURMD_NODENAME": "node01"}
    table = {"node01": ["127.0.1.1"], "node02": ["192.168.10.12"], "node03": ["10.1.0.13"]}
    # the step runs on node01 and node03: node03's Ethernet subnet wins over node02's (not in this step)
    assert choose(environ, table=table)[0] == "10.1.0.11"


def test_only_loopback_falls_back_to_the_host_name():
    addr, why = choose(interfaces={"lo": [("127.0.0.1", "255.0.0.0")]}, table={"node01": ["127.0.1.1"]})
    assert addr == "node01" and "host name" in why


def test_link_local_and_virtual_addresses_are_last_resorts():
    interfaces = {"eth1": [("169.254.3.4", "255.255.0.0")], "veth12": [("10.244.0.7", "255.255.255.0")]}
    assert pick_interface_address(interfaces) == "10.244.0.7"
    assert pick_interface_address({"lo": [("127.0.0.1", "255.0.0.0")]}) is None


# -- gloo's interface ---------------------------------------------------------------------------------------------
def test_gloo_binds_the_rendezvous_subnet_when_the_host_name_is_loopback():
    args = dict(num_hosts=2, hostname="node02", interfaces={"lo": [("127.0.0.1", "255.0.0.0")],
                                                              "eth0": [("10.1.0.12", "255.255.0.0")]})
    debian = resolver({"node02": ["127.0.1.1"]})
    assert gloo_interface(environ={}, master_addr="10.1.0.11", resolve=debian, **args) == "eth0"
    assert gloo_interface(environ={"GLOO_SOCKET_IFNAME": "ib0"}, master_addr="10.1.0.11", resolve=debian,
                          **args) is None
    routable = resolver({"node02": ["10.1.0.12"]})
    assert gloo_interface(environ={}, master_addr="10.1.0.11", resolve=routable, **args) is None
    assert gloo_interface(environ={}, master_addr=LOOPBACK, resolve=debian,
                          **{**args, "num_hosts": 1}) is None


# -- device index -------------------------------------------------------------------------------------------------
def test_posed_nodes_do_not_share_a_gpu():
    """4 ranks on one 4-GPU host posed as 2 nodes of 2: posed local ranks are 0,1,0,1, host-local 0..3."""
    assert [device_index(host_local, 4) for host_local in range(4)] == [0, 1, 2, 3]


def test_one_visible_device_per_task_and_more_ranks_than_devices():
    assert [device_index(rank, 1) for rank in range(4)] == [0, 0, 0, 0]  # srun --gpus-per-task=1
    assert [device_index(rank, 2) for rank in range(4)] == [0, 1, 0, 1]


def test_no_device_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        device_index(0, 0)
