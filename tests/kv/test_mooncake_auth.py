"""The side channel's authentication, allow-list and secret settings, on their own (no TransferEngine)."""

from __future__ import annotations

import time

import pytest

from ds_plugins.kv.mooncake import auth
from ds_plugins.kv.mooncake.allow import AllowList
from ds_plugins.kv.mooncake.auth import Authenticator, NotAuthenticated
from ds_plugins.kv.mooncake.config import ConfigError, MooncakeConfig
from ds_plugins.kv.mooncake.handshake import MAX_PEERS, HandshakeClient, PeerTimeout
from ds_plugins.kv.mooncake.messages import GetLayout
from tests.kv.conftest import free_port

KEY = b"k" * 32


def test_request_opens_once_within_the_clock_window():
    sender, receiver = Authenticator(KEY), Authenticator(KEY)
    wire, nonce = sender.seal_request(b"body")
    assert receiver.open_request(wire) == (b"body", nonce)
    with pytest.raises(NotAuthenticated, match="replayed"):
        receiver.open_request(wire)
    stale, _ = Authenticator(KEY, clock=lambda: time.time() - auth.MAX_SKEW_S - 5).seal_request(b"body")
    with pytest.raises(NotAuthenticated, match="off this host's clock"):
        receiver.open_request(stale)
    with pytest.raises(NotAuthenticated, match="another shared secret"):
        receiver.open_request(Authenticator(b"x" * 32).seal_request(b"body")[0])
    with pytest.raises(NotAuthenticated, match="no shared secret"):
        receiver.open_request(Authenticator(None).seal_request(b"body")[0])


def test_answer_is_bound_to_its_request():
    client, server = Authenticator(KEY), Authenticator(KEY)
    wire, nonce = client.seal_request(b"q")
    _, got = server.open_request(wire)
    answer = server.seal_answer(b"a", got)
    assert client.open_answer(answer, nonce) == b"a"
    _, other = client.seal_request(b"q2")
    with pytest.raises(NotAuthenticated, match="not the answer to this request"):
        client.open_answer(answer, other)
    with pytest.raises(NotAuthenticated, match="no secret"):
        client.open_answer(Authenticator(None).seal_answer(b"a", nonce), nonce)


def test_replay_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "MAX_NONCES", 8)
    now = [1000.0]
    receiver, sender = Authenticator(KEY, clock=lambda: now[0]), Authenticator(KEY, clock=lambda: now[0])
    for _ in range(8):
        receiver.open_request(sender.seal_request(b"x")[0])
    with pytest.raises(NotAuthenticated, match="more than 8 requests"):
        receiver.open_request(sender.seal_request(b"x")[0])
    now[0] += auth.MAX_SKEW_S + 1  # the remembered nonces' window has passed: forgotten, room again
    receiver.open_request(sender.seal_request(b"x")[0])
    assert len(receiver._seen) == 1


def test_allow_list():
    allowed = AllowList(["10.0.0.0/24", "fd00::/64", "prefill-0.internal"])
    assert allowed.allows("10.0.0.7") and allowed.allows("::ffff:10.0.0.7") and allowed.allows("fd00::5")
    assert allowed.allows("PREFILL-0.internal")
    assert not allowed.allows("10.0.1.7") and not allowed.allows("169.254.169.254") and not allowed.allows("evil")
    assert AllowList(None).allows("anything") and not AllowList([]).allows("10.0.0.7")


def config(extra: dict, env: dict | None = None) -> MooncakeConfig:
    return MooncakeConfig.from_mapping(
        {"kv_role": "kv_consumer", "engine_id": "d0", "kv_connector_extra_config": extra}, env=env or {}
    )


def test_secret_comes_from_a_file_or_the_environment_and_never_from_the_json(tmp_path):
    assert config({}).secret is None
    env = config({}, {"DS_PLUGINS_MOONCAKE_SECRET": "e" * 20})
    assert env.secret == b"e" * 20 and env.secret_from == "DS_PLUGINS_MOONCAKE_SECRET"
    key = tmp_path / "mooncake.key"
    key.write_text("f" * 40 + "\n")
    from_file = config({"auth_secret_file": str(key)}, {"DS_PLUGINS_MOONCAKE_SECRET": "e" * 20})
    assert from_file.secret == b"f" * 40 and "auth_secret_file" in from_file.secret_from
    assert "f" * 40 not in repr(from_file)  # never printed with the config
    with pytest.raises(ConfigError, match="auth_secret is not accepted"):
        config({"auth_secret": "x" * 40})
    with pytest.raises(ConfigError, match="at least 16 bytes, got 5"):
        config({}, {"DS_PLUGINS_MOONCAKE_SECRET": "short"})
    with pytest.raises(ConfigError, match=r"auth_secret_file: cannot read '/nonexistent/k'"):
        config({"auth_secret_file": "/nonexistent/k"})
    assert config({"allowed_peers": ["10.0.0.0/24", "p0"]}).allowed_peers == ("10.0.0.0/24", "p0")
    with pytest.raises(ConfigError, match="allowed_peers must be a list"):
        config({"allowed_peers": "10.0.0.1"})
    with pytest.raises(ConfigError, match="not a network"):
        config({"allowed_peers": ["10.0.0.0/99"]})


def test_client_keeps_a_bounded_number_of_peer_sockets():
    client = HandshakeClient(0.01)
    try:
        for _ in range(MAX_PEERS + 20):
            with pytest.raises(PeerTimeout):
                client.request("127.0.0.1", free_port(), GetLayout(engine_id="p0"))
            assert client.known_peers <= MAX_PEERS and client.open_sockets <= MAX_PEERS
    finally:
        client.close()
