"""amqps: TLS to a RabbitMQ node of the test's own, with a CA the test makes.

The node listens for TLS with a certificate for ``localhost`` signed by the
test's CA, asks clients for a certificate (``verify_peer``, not required) and
takes ``EXTERNAL`` logins (``rabbitmq_auth_mechanism_ssl``, user name from the
certificate's CN).
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
import treq
import trustme
from twisted.internet.error import ConnectionRefusedError

from .rabbit_node import RabbitNode
from .support import event_message, health, inbound_message, pause, wait_for

MESSAGES = "/channels/test-channel/messages"
CLIENT_USER = "junebug-client"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_node(ca):
    server = ca.issue_cert("localhost")
    node = RabbitNode(
        conf=[
            "listeners.ssl.default = 127.0.0.1:{tls_port}",
            "ssl_options.cacertfile = CA",
            "ssl_options.certfile = CERT",
            "ssl_options.keyfile = KEY",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = AMQPLAIN",
            "auth_mechanisms.3 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ],
        plugins=["rabbitmq_auth_mechanism_ssl"],
        files={
            "ca.pem": ca.cert_pem.bytes(),
            "server.pem": server.cert_chain_pems[0].bytes(),
            "server.key": server.private_key_pem.bytes(),
        },
    )
    node.conf = [
        line.replace("CA", node.path("ca.pem"))
        .replace("CERT", node.path("server.pem"))
        .replace("KEY", node.path("server.key"))
        if line.startswith("ssl_options.")
        else line
        for line in node.conf
    ]
    node.start()
    node.ctl("add_user", CLIENT_USER, "unused-password")
    node.ctl("set_permissions", CLIENT_USER, ".*", ".*", ".*")
    yield node
    node.destroy()


@pytest.fixture
def pem_files(tmp_path, ca):
    """Write PEM files for the service; returns a function name -> path."""

    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return write


@pytest.fixture
def node_broker(tls_node):
    broker = tls_node.broker()
    yield broker
    broker.close()


async def wait_amqp_error(service, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        assert service.process.poll() is None, service.log()
        try:
            code, body = await health(service)
        except ConnectionRefusedError:
            pass
        else:
            last = body
            amqp = body["components"]["amqp"]
            if code == 503 and amqp.get("error"):
                return amqp
        assert time.monotonic() < deadline, last
        await pause(0.1)


async def post(service, **fields) -> tuple[int, dict]:
    body = {"to": "+27820000001", "from": "8110", "content": "over TLS", **fields}
    response = await treq.post(service.url + MESSAGES, data=json.dumps(body).encode())
    return response.code, json.loads(await response.text())


def assert_clean(log: str) -> None:
    for bad in ("Traceback", "Unhandled Error", "Unhandled error", "NoTransition"):
        assert bad not in log, log


@pytest_twisted.ensureDeferred
async def test_amqps_outbound_inbound_and_events(
    make_service, tls_node, ca, pem_files, node_broker, connector, sink
):
    service = make_service(
        amqp_url=f"amqps://guest:guest@localhost:{tls_node.tls_port}/%2F",
        amqp_tls_ca_file=pem_files("ca.pem", ca.cert_pem.bytes()),
    )
    code, body = await health(service)
    assert code == 200
    connections = body["components"]["amqp"]["connections"]
    assert connections["publish"]["broker"] == f"localhost:{tls_node.tls_port}"
    assert connections["consume"]["state"] == "open"
    code, answer = await post(service, event_url=f"{sink.url}/event")
    assert code == 201, answer
    message_id = answer["result"]["message_id"]
    outbound = await node_broker.wait_json(f"{connector}.outbound")
    assert outbound["message_id"] == message_id
    inbound = inbound_message(connector)
    node_broker.publish(f"{connector}.inbound", inbound)
    await wait_for(lambda: sink.at("/inbound"), what="inbound over TLS")
    assert sink.at("/inbound")[0]["json"]["message_id"] == inbound["message_id"]
    node_broker.publish(f"{connector}.event", event_message(message_id, "ack"))
    await wait_for(lambda: sink.at("/event"), what="event over TLS")
    assert sink.at("/event")[0]["json"]["message_id"] == message_id
    # A clean stop too: TLS close_notify, no error while the reactor shuts down.
    assert service.stop() in (0, -15)
    log = service.log()
    assert "junebug-api stopped" in log
    assert_clean(log)


@pytest_twisted.ensureDeferred
async def test_amqps_url_alone_verifies_with_the_system_trust_store(
    make_service, tls_node, ca, pem_files, node_broker, connector
):
    """A vumi2 config with only an amqps:// URL: the system trust store checks
    the broker. The test's CA stands in for the system's through OpenSSL's
    SSL_CERT_FILE; without it in the store the same config is refused."""
    url = f"amqps://guest:guest@localhost:{tls_node.tls_port}/%2F"
    service = make_service(
        amqp_url=url, env={"SSL_CERT_FILE": pem_files("ca.pem", ca.cert_pem.bytes())}
    )
    code, answer = await post(service)
    assert code == 201, answer
    outbound = await node_broker.wait_json(f"{connector}.outbound")
    assert outbound["message_id"] == answer["result"]["message_id"]
    other = pem_files("other.pem", trustme.CA().cert_pem.bytes())
    untrusted = make_service(wait=False, amqp_url=url, env={"SSL_CERT_FILE": other})
    amqp = await wait_amqp_error(untrusted)
    assert amqp["error"].endswith("is signed by an unknown CA"), amqp
    assert_clean(service.log() + untrusted.log())


@pytest_twisted.ensureDeferred
async def test_unknown_ca_is_down_with_the_reason_and_503(
    make_service, tls_node, pem_files, node_broker, connector
):
    other = trustme.CA()
    service = make_service(
        wait=False,
        amqp_url=f"amqps://guest:guest@localhost:{tls_node.tls_port}/%2F",
        amqp_tls_ca_file=pem_files("other-ca.pem", other.cert_pem.bytes()),
    )
    amqp = await wait_amqp_error(service)
    address = f"localhost:{tls_node.tls_port}"
    assert amqp["error"] == f"TLS: the certificate of {address} is signed by an unknown CA"
    for _ in range(3):
        code, answer = await post(service)
        assert code == 503, answer
    await wait_for(
        lambda: service.log().count("is signed by an unknown CA") >= 4,
        timeout=20,
        what="reconnect attempts going on",
    )
    node_broker.declare(f"{connector}.outbound")
    assert node_broker.count(f"{connector}.outbound") == 0
    assert_clean(service.log())


@pytest_twisted.ensureDeferred
async def test_host_name_mismatch_and_plain_amqp_to_the_tls_port(
    make_service, tls_node, ca, pem_files
):
    # The node's certificate names localhost, not 127.0.0.1.
    service = make_service(
        wait=False,
        amqp_url=f"amqps://guest:guest@127.0.0.1:{tls_node.tls_port}/%2F",
        amqp_tls_ca_file=pem_files("ca.pem", ca.cert_pem.bytes()),
    )
    amqp = await wait_amqp_error(service)
    assert amqp["error"] == (
        f"TLS: the certificate of 127.0.0.1:{tls_node.tls_port} does not match"
        " the host name 127.0.0.1"
    )
    plain = make_service(wait=False, amqp_url=f"amqp://guest:guest@127.0.0.1:{tls_node.tls_port}")
    amqp = await wait_amqp_error(plain)
    assert amqp["error"] == (
        f"127.0.0.1:{tls_node.tls_port} answers with TLS: use amqps:// (or amqp.tls: true)"
    )
    assert_clean(service.log() + plain.log())


@pytest_twisted.ensureDeferred
async def test_client_certificate_with_external_login(
    make_service, tls_node, ca, pem_files, node_broker, connector
):
    client = ca.issue_cert(CLIENT_USER, common_name=CLIENT_USER)
    service = make_service(
        amqp_url=f"amqps://localhost:{tls_node.tls_port}/%2F",
        amqp_tls_ca_file=pem_files("ca.pem", ca.cert_pem.bytes()),
        amqp_tls_cert_file=pem_files("client.pem", client.cert_chain_pems[0].bytes()),
        amqp_tls_key_file=pem_files("client.key", client.private_key_pem.bytes()),
        amqp_auth_mechanism="EXTERNAL",
    )
    code, answer = await post(service)
    assert code == 201, answer
    outbound = await node_broker.wait_json(f"{connector}.outbound")
    assert outbound["message_id"] == answer["result"]["message_id"]
    users = tls_node.ctl("list_connections", "user", "auth_mechanism").stdout
    assert f"{CLIENT_USER}\tEXTERNAL" in users
    assert_clean(service.log())


@pytest_twisted.ensureDeferred
async def test_client_certificate_refused(make_service, tls_node, ca, pem_files):
    stranger = trustme.CA().issue_cert(CLIENT_USER, common_name=CLIENT_USER)
    service = make_service(
        wait=False,
        amqp_url=f"amqps://localhost:{tls_node.tls_port}/%2F",
        amqp_tls_ca_file=pem_files("ca.pem", ca.cert_pem.bytes()),
        amqp_tls_cert_file=pem_files("client.pem", stranger.cert_chain_pems[0].bytes()),
        amqp_tls_key_file=pem_files("client.key", stranger.private_key_pem.bytes()),
        amqp_auth_mechanism="EXTERNAL",
    )
    amqp = await wait_amqp_error(service)
    assert amqp["error"] == f"TLS: localhost:{tls_node.tls_port} refused our client certificate"
    code, _ = await post(service)
    assert code == 503
    assert_clean(service.log())


@pytest_twisted.ensureDeferred
async def test_tls_verify_false_connects_and_warns(make_service, tls_node, pem_files):
    service = make_service(
        amqp_url=f"amqps://guest:guest@127.0.0.1:{tls_node.tls_port}/%2F",
        amqp_tls_verify=False,
    )
    code, _ = await health(service)
    assert code == 200
    assert "amqp_tls_verify is false" in service.log()
