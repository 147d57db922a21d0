"""The suite proves it needs no network: under tools/isolated.sh it runs with loopback only."""

import os
import socket

import pytest


@pytest.mark.skipif(os.environ.get("SELFMOA_NETNS") != "1", reason="not inside tools/isolated.sh")
def test_only_loopback_is_reachable():
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback itself works
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_hub_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
