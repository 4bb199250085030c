"""A real Prometheus serving https with a certificate of a private CA: the connection's `ca_bundle` trusts it,
`verify: false` skips the check, and by default (the system's CAs) the query fails and says why."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.models.connection import Connection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshstack.process import _stop, _tail, free_port, prometheus_binary
from meshwave.connections import prometheus_source
from meshwave.prometheus import PrometheusUnavailable


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_certificates(where: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (CA bundle, server cert, server key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("meshwave test CA")).issuer_name(_name("meshwave test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = where / "ca.pem", where / "server.pem", where / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem(key))
    return paths


@pytest.fixture(scope="module")
def https_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A Prometheus (no scrape targets: `vector(1)` needs none) on https; yields its URL and the CA bundle."""
    work = tmp_path_factory.mktemp("prometheus-tls")
    ca, cert, key = write_certificates(work)
    (work / "web.yml").write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    (work / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([prometheus_binary(), f"--config.file={work / 'prometheus.yml'}",
                                 f"--web.config.file={work / 'web.yml'}", f"--storage.tsdb.path={work / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{_tail(log)}"
            try:
                prometheus_source(connection(url, {"ca_bundle": str(ca)}), timeout=2).instant("vector(1)")
                break
            except PrometheusUnavailable:
                assert time.monotonic() < deadline, f"prometheus not ready on https in 60 s:\n{_tail(log)}"
                time.sleep(0.3)
        yield url, ca
    finally:
        _stop(proc)


def connection(url: str, extra: dict[str, Any]) -> Connection:
    return Connection(conn_id="prom_https", conn_type="meshwave_prometheus", host=url, extra=extra)


def test_the_ca_bundle_trusts_the_private_ca(https_prometheus: tuple[str, Path]) -> None:
    url, ca = https_prometheus
    [sample] = prometheus_source(connection(url, {"ca_bundle": str(ca)})).instant("vector(1)")
    assert sample.value == 1.0


def test_by_default_a_certificate_of_an_unknown_ca_is_refused(https_prometheus: tuple[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = https_prometheus
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # requests would trust what these name instead
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(PrometheusUnavailable, match=f"Prometheus at {url}: .*CERTIFICATE_VERIFY_FAILED"):
        prometheus_source(connection(url, {})).instant("vector(1)")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # what verify false asks for
def test_verify_false_skips_the_check(https_prometheus: tuple[str, Path]) -> None:
    url, _ = https_prometheus
    [sample] = prometheus_source(connection(url, {"verify": False})).instant("vector(1)")
    assert sample.value == 1.0
