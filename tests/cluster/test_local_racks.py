"""A stale Ray address file (left by a killed cluster) must not be joined."""

import socket

from cluster.launch.local_racks import reachable_ray_address
from comm.launch import free_port


def test_stale_address_file_is_not_reachable_and_a_live_one_is(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    f = tmp_path / "ray" / "ray_current_cluster"
    assert reachable_ray_address() is None  # no file
    f.write_text(f"127.0.0.1:{free_port()}\n")  # nobody listens there
    assert reachable_ray_address(timeout_s=0.5) is None
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        f.write_text(addr + "\n")
        assert reachable_ray_address() == addr
    f.write_text("garbage")
    assert reachable_ray_address() is None
