"""A two-node Ray cluster on this machine, in a process of its own, for tests/test_ray_build.py.

    python tests/ray_cluster.py [--own-network]

Starts a head and a worker node of one CPU each (`ray.cluster_utils.Cluster`, Ray's own
multi-node test cluster), prints one JSON line on stdout, {"address": HEAD, "own_network": BOOL},
once both are up, keeps them until its stdin closes (the test module ends, or its process dies)
and shuts them down.

Ray on Linux binds every node to the machine's network address, never to loopback. With
--own-network (it needs CAP_SYS_ADMIN, so root) this process first moves into a new network
namespace whose only interface, loopback, is up; its nodes bind to 127.0.0.1 and no traffic
leaves the machine. Drivers join it with `nsenter --net=/proc/PID/ns/net`. Without the
capability it says so ("own_network": false) and runs on the machine's network.

Why a process of its own: a namespace entered by one thread of the test process is inherited by
every thread started meanwhile, gRPC's pollers among them, and they stay there; afterwards the
test process could no longer reach its own loopback servers (a CI run failed 51 tests so).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def enter_loopback_only_network() -> bool:
    """This process (still single-threaded) into a new network namespace with loopback up."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
    return True


def main(argv: list[str]) -> int:
    own_network = "--own-network" in argv and enter_loopback_only_network()
    from ray.cluster_utils import Cluster  # after unshare: Ray starts threads on import

    node: dict = {"num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}
    if own_network:
        node["node_ip_address"] = "127.0.0.1"
    nodes = Cluster(initialize_head=True, connect=False, head_node_args={**node, "include_dashboard": False})
    try:
        nodes.add_node(**node)
        nodes.wait_for_nodes()
        print(json.dumps({"address": nodes.address, "own_network": own_network}), flush=True)
        sys.stdin.read()  # until the test closes our stdin or dies
    finally:
        nodes.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
