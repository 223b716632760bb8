"""Broker credentials and TLS: a mosquitto TLS listener with certificates made here, a password
file, and client certificates; wrong settings fail with a clear reason while the daemon retries."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefn.daemon import Daemon
from edgefn.mqtt.local_broker import LocalBroker, free_port
from tests.conftest import Collector, publish
from tests.test_daemon import digit_payloads

pytestmark = pytest.mark.broker


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False, san: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _cert("edgefn test CA", ca_key, ca=True)
    other_ca = _cert("some other CA", other_key, ca=True)
    files = {
        "ca": _write(d / "ca.pem", ca), "other_ca": _write(d / "other-ca.pem", other_ca),
        "server": _write(d / "server.pem", _cert("localhost", server_key, ca, ca_key, san=True)),
        "server_key": _write(d / "server.key", key=server_key),
        "client": _write(d / "client.pem", _cert("edgefn-device", client_key, ca, ca_key)),
        "client_key": _write(d / "client.key", key=client_key),
        "passwords": d / "passwords",
    }
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(files["passwords"]), "device", "right-password"], check=True)
    files["passwords"].chmod(0o600)
    return files


@pytest.fixture()
def tls_broker(pki: dict[str, Path]):
    tls_port = free_port()
    extra = (f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
             f"keyfile {pki['server_key']}\nrequire_certificate true\nallow_anonymous false\n"
             f"password_file {pki['passwords']}\n")
    with LocalBroker(extra_config=extra) as broker:
        broker.tls_port = tls_port
        yield broker


def _daemon(settings_for, broker, digits_fn, **tls) -> Daemon:
    settings = settings_for(broker, digits_fn, broker=f"mqtts://127.0.0.1:{broker.tls_port}", **tls)
    daemon = Daemon(settings)
    daemon.start()
    return daemon


def test_tls_with_client_certificate_and_password_serves_events(tls_broker, pki, settings_for, digits_fn, monkeypatch):
    monkeypatch.setenv("EDGEFN_PASSWORD", "right-password")
    results = Collector(tls_broker.port, "results/+/digits")
    daemon = _daemon(settings_for, tls_broker, digits_fn, username="device", ca_file=pki["ca"],
                     cert_file=pki["client"], key_file=pki["client_key"])
    try:
        daemon.wait_connected(15)
        publish(tls_broker.port, "sensors/secure/digits", digit_payloads(5, "tls")[0])
        assert len(results.wait_for(5)) == 5
    finally:
        daemon.stop(drain_timeout=2)
        results.close()


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-password"])
def test_tls_wrong_settings_fail_clearly_and_keep_retrying(case, tls_broker, pki, settings_for, digits_fn, monkeypatch):
    monkeypatch.setenv("EDGEFN_PASSWORD", "wrong-password" if case == "wrong-password" else "right-password")
    daemon = _daemon(settings_for, tls_broker, digits_fn, username="device",
                     ca_file=pki["other_ca" if case == "wrong-ca" else "ca"],
                     cert_file=pki["client"], key_file=pki["client_key"])
    try:
        deadline = time.monotonic() + 10
        while daemon.broker_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemon.connected
        error = daemon.broker_error or ""
        if case == "wrong-ca":
            assert "certificate verify failed" in error
        else:
            assert "refused" in error and "authori" in error.lower()
        health = daemon.health()
        assert health["status"] == "degraded" and health["broker"] == error
    finally:
        daemon.stop(drain_timeout=0.5)
