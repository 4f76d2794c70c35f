"""Authentication, limits, slow clients, TLS and secret hygiene, on the real process."""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import pytest_twisted
import treq

from .support import event_message, free_port, inbound_message, pause, wait_for

MESSAGES = "/channels/test-channel/messages"
MESSAGE = {"to": "+1", "from": "2", "content": "x"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def post(service, body=MESSAGE, headers=None):
    response = await treq.post(
        service.url + MESSAGES, data=json.dumps(body).encode(), headers=headers or {}
    )
    return response, json.loads(await response.text())


@pytest_twisted.ensureDeferred
async def test_api_authentication(make_service, broker, connector):
    service = make_service(
        api_auth_username="rapidpro", api_auth_password="pässword", api_auth_token="tok-123"
    )
    refused = [
        {},
        {"Authorization": basic("rapidpro", "wrong")},
        {"Authorization": basic("someone", "pässword")},
        {"Authorization": "Token nope"},
        {"Authorization": "Bearer tok-123"},
        {"Authorization": "Basic !!!notbase64"},
    ]
    for headers in refused:
        response, answer = await post(
            service, {**MESSAGE, "event_url": "http://127.0.0.1:9/e"}, headers
        )
        assert response.code == 401, headers
        assert response.headers.getRawHeaders("WWW-Authenticate") == ['Basic realm="junebug-api"']
        assert answer["status"] == 401
        assert answer["code"] == "Unauthorized"
        assert answer["result"]["errors"][0]["type"] == "Unauthorized"
    assert broker.count(f"{connector}.outbound") == 0

    response, _ = await post(service, headers={"Authorization": basic("rapidpro", "pässword")})
    assert response.code == 201
    response, _ = await post(service, headers={"Authorization": "Token tok-123"})
    assert response.code == 201
    assert broker.count(f"{connector}.outbound") == 2

    health = await treq.get(service.url + "/health")
    assert health.code == 200
    text = await health.text()
    assert "tok-123" not in text and "pässword" not in text
    assert "messages API is open" not in service.log()


@pytest_twisted.ensureDeferred
async def test_open_api_warns_once(make_service):
    service = make_service()
    assert service.log().count("The messages API is open") == 1


def raw_request(port: int, data: bytes, read_timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_request_size_limit(make_service, broker, connector):
    service = make_service(max_request_size=1000)
    head = (f"POST {MESSAGES} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n").encode()
    # A declared length over the limit is refused before the body is sent.
    answer = raw_request(service.port, head + b"Content-Length: 50000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == 413
    assert body["description"] == "request too large"
    # A chunked body is cut off as soon as it grows past the limit.
    chunk = b"x" * 600
    chunked = b"Transfer-Encoding: chunked\r\n\r\n" + (b"258\r\n" + chunk + b"\r\n") * 3
    answer = raw_request(service.port, head + chunked)
    assert answer.startswith(b"HTTP/1.1 413 ")
    # A body within the limit still works, also with Expect: 100-continue.
    small = json.dumps(MESSAGE).encode()
    answer = raw_request(
        service.port,
        head + f"Content-Length: {len(small)}\r\nConnection: close\r\n\r\n".encode() + small,
    )
    assert answer.startswith(b"HTTP/1.1 201 ")
    assert broker.count(f"{connector}.outbound") == 1


def test_slow_and_idle_clients_are_cut_off(make_service):
    # The idle timeout outlasts the read deadline, as with the defaults (60 and 30 s),
    # so a slow request gets its 408 rather than a silent close.
    service = make_service(http_read_timeout=1, http_idle_timeout=2)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall(f"POST {MESSAGES} HTTP/1.1\r\nHost: x\r\n".encode())
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - started < 5
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(300)]
    try:
        # Hundreds of idle connections do not stop others from being served.
        with urllib.request.urlopen(
            urllib.request.Request(
                service.url + MESSAGES, data=json.dumps(MESSAGE).encode(), method="POST"
            ),
            timeout=5,
        ) as r:
            assert r.status == 201
        # And the idle ones are closed by the server.
        for s in idle[:5]:
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "text/plain"],
)
def test_content_types(make_service, content_type):
    service = make_service()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    headers = {} if content_type is None else {"Content-Type": content_type}
    conn.request("POST", MESSAGES, body=json.dumps(MESSAGE).encode(), headers=headers)
    response = conn.getresponse()
    response.read()
    assert response.status == 201
    conn.request("POST", MESSAGES, body=b"to=1&content=x", headers=headers)
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["description"] == "json decode error"
    conn.close()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_endpoint(make_service, tmp_path, broker, connector):
    from .support import free_port

    cert, key = make_certificate(tmp_path)
    port = free_port()
    service = make_service(
        wait=False,
        http_bind=f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"https://127.0.0.1:{port}{MESSAGES}",
                    data=json.dumps(MESSAGE).encode(),
                    method="POST",
                ),
                context=context,
                timeout=5,
            ) as r:
                assert r.status == 201
                break
        except OSError:
            assert service.process.poll() is None, service.log()
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.1)
    assert broker.count(f"{connector}.outbound") == 1


@pytest.fixture
def amqp_user():
    user, password = "jbtest-secret-user", "Amqp-S3cret-pw"
    subprocess.run(["rabbitmqctl", "add_user", user, password], capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", "/", user, ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    yield user, password
    subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True)


@pytest_twisted.ensureDeferred
async def test_no_secret_in_logs_health_or_answers(
    make_service, sink, connector, amqp_user, broker
):
    user, amqp_password = amqp_user
    secrets = {
        amqp_password,
        "mo-url-Pw1",
        "mo-Token-2",
        "default-ev-Token-3",
        "api-Pw-4",
        "api-Token-5",
        "event-url-Pw-6",
        "event-Token-7",
    }
    service = make_service(
        log_level="DEBUG",
        delivery_max_attempts=2,
        amqp_url=f"amqp://{user}:{amqp_password}@127.0.0.1:5672/%2F",
        mo_message_url=sink.url.replace("http://", "http://rp:mo-url-Pw1@") + "/inbound",
        mo_message_url_auth_token="mo-Token-2",
        default_event_url=sink.url + "/default-event",
        default_event_auth_token="default-ev-Token-3",
        api_auth_username="rapidpro",
        api_auth_password="api-Pw-4",
        api_auth_token="api-Token-5",
    )
    answers = []
    response, answer = await post(service, headers={"Authorization": basic("rapidpro", "bad")})
    answers.append(answer)
    event_url = sink.url.replace("http://", "http://ev:event-url-Pw-6@") + "/event"
    response, answer = await post(
        service,
        {**MESSAGE, "event_url": event_url, "event_auth_token": "event-Token-7"},
        {"Authorization": "Token api-Token-5"},
    )
    assert response.code == 201
    answers.append(answer)
    message_id = answer["result"]["message_id"]
    response, answer = await post(service, {"bad": 1}, {"Authorization": "Token api-Token-5"})
    answers.append(answer)
    sink.statuses = [408, 408, 408, 408]  # retryable, but no outage
    broker.publish(f"{connector}.inbound", inbound_message(connector))
    broker.publish(f"{connector}.event", event_message(message_id, "ack"))
    await wait_for(lambda: broker.count(f"{connector}.inbound.failed") == 1, what="dead letter")
    await wait_for(lambda: broker.count(f"{connector}.event.failed") == 1, what="dead letter")
    assert len(sink.at("/event")) == 2
    assert sink.at("/event")[0]["headers"]["authorization"] == "Token event-Token-7"
    health = await (await treq.get(service.url + "/health")).text()
    exposed = service.log() + health + json.dumps(answers)
    assert "mo_message_url" in exposed  # the config echo is there, masked
    leaked = sorted(secret for secret in secrets if secret in exposed)
    assert leaked == []


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_callback_urls_stay_private_with_rapidpro_down(
    make_service, broker, channel_id, log_format
):
    """RapidPro's channel UUID (its path) and the tokens in a callback URL's
    query are capabilities: the open /health shows scheme://host:port only,
    the log (either format) neither, GET /channels/<id> the path with the
    query values masked."""
    origin = f"http://127.0.0.1:{free_port()}"  # nothing listens: RapidPro is down
    mo_uuid, event_uuid, default_uuid = (str(uuid.uuid4()) for _ in range(3))
    tokens = ("mo-qT0ken", "ev-qT0ken", "dev-qT0ken")
    mo_url = f"{origin}/c/jn/{mo_uuid}/receive?token={tokens[0]}&lang=en"
    event_url = f"{origin}/c/jn/{event_uuid}/event?token={tokens[1]}"
    default_event_url = f"{origin}/c/jn/{default_uuid}/event?token={tokens[2]}"
    service = make_service(
        log_format=log_format,
        log_level="DEBUG",
        channels={
            channel_id: {
                "mo_url": mo_url,
                "default_event_url": default_event_url,
                "api_auth_token": "api-Token-8",
            }
        },
    )
    auth = {"Authorization": "Token api-Token-8"}
    response = await treq.post(
        f"{service.url}/channels/{channel_id}/messages",
        data=json.dumps({**MESSAGE, "event_url": event_url}).encode(),
        headers=auth,
    )
    message_id = json.loads(await response.text())["result"]["message_id"]
    broker.publish(f"{channel_id}.inbound", inbound_message(channel_id))
    broker.publish(f"{channel_id}.event", event_message(message_id, "ack"))
    broker.publish(f"{channel_id}.event", event_message("no-event-info", "ack"))

    async def health() -> dict:
        return json.loads(await (await treq.get(service.url + "/health")).text())

    async def failing() -> dict | None:
        status = await health()
        channel = status["channels"][channel_id]
        both = channel["mo_message_url"].get("error") and channel["event_url"].get("error")
        return status if both else None

    status = None
    for _ in range(200):
        status = await failing()
        if status is not None:
            break
        await pause(0.05)
    assert status is not None, service.log()
    health_text = json.dumps(status)
    assert f"POST to {origin} failed" in status["channels"][channel_id]["mo_message_url"]["error"]
    assert "/c/jn" not in health_text and "?" not in health_text, health_text

    _, info = await call_json(service, f"/channels/{channel_id}", auth)
    assert info["result"]["mo_url"] == f"{origin}/c/jn/{mo_uuid}/receive?token=***&lang=***"
    assert info["result"]["default_event_url"] == f"{origin}/c/jn/{default_uuid}/event?token=***"

    await wait_for(lambda: "c/jn/***/event?token=***" in service.log(), what="event failure")
    log = service.log()
    assert f"{origin}/c/jn/***/receive?token=***&lang=***" in log  # logged, masked
    if log_format == "json":
        assert all(json.loads(line) for line in log.splitlines())
    for secret in (*tokens, mo_uuid, event_uuid, default_uuid):
        assert secret not in log, secret
        assert secret not in health_text, secret


async def call_json(service, path: str, headers: dict) -> tuple[int, dict]:
    response = await treq.get(service.url + path, headers=headers)
    return response.code, json.loads(await response.text())
