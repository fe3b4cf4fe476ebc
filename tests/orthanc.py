"""A real Orthanc PACS for the tests: Debian's ``orthanc`` and ``orthanc-dicomweb``, started per test module.

Each server gets its own throwaway configuration, storage and index under a fresh folder, free HTTP
and DICOM ports on 127.0.0.1 (``RemoteAccessAllowed`` false), and HTTP basic authentication with
one registered user, so the tests also prove that credentials from the environment reach the
PACS. Run as root (CI), Orthanc runs as ``nobody`` (``runuser``): a PACS has no business with
root's rights, and its folder is handed to that user. Without the packages the tests skip with the
command that installs them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import select
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from helpers import free_port, stop_process_group, wait_until_answering

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_FOLDER = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_FOLDER / "libOrthancDicomWeb.so"
INSTALL = "apt-get install -y orthanc orthanc-dicomweb"
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class Orthanc:
    """A running Orthanc: its DICOMweb base URL, REST root, the one user's credentials, its log."""

    url: str  # http(s)://127.0.0.1:<port>
    username: str
    password: str
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.password


def require_orthanc() -> None:
    """Skip the calling test when Orthanc or its DICOMweb plugin is not installed."""
    if not (os.access(ORTHANC, os.X_OK) and DICOMWEB_PLUGIN.is_file()):
        pytest.skip(f"Orthanc with the DICOMweb plugin is not installed ({INSTALL})")


def _configuration(root: Path, http_port: int, dicom_port: int, username: str, password: str) -> dict:
    return {
        "Name": "pneumo-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "PNEUMOTEST",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "Plugins": [str(PLUGIN_FOLDER)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        # Stored as received, in the syntax the test chose: transcoding would defeat the test.
        "StorageCompression": False,
        "HttpsVerifyPeers": False,
    }


def _unprivileged(root: Path) -> list[str]:
    """The command prefix that drops root to ``nobody``, with ``root`` handed to that user; none if not root."""
    if os.geteuid() != 0:
        return []
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", UNPRIVILEGED_USER, "--"]


@contextlib.contextmanager
def run_orthanc(log_folder: Path, startup_seconds: float = 60) -> Iterator[Orthanc]:
    """Start Orthanc on free ports with a fresh configuration and storage; stop it and remove its folder after.

    Args:
        log_folder: Where its log goes (kept after the server stops, for a failing test's report).
        startup_seconds: How long it may take to answer ``/system``.
    """
    require_orthanc()
    # Not under pytest's tmp_path: that folder is private to root, and Orthanc may run as nobody.
    root = Path(tempfile.mkdtemp(prefix="pneumo-orthanc-"))
    (root / "storage").mkdir()
    (root / "index").mkdir()
    username, password = "pneumo-reader", "a-test-password-" + os.urandom(6).hex()
    http_port = dicom_port = free_port()
    while dicom_port == http_port:  # two probes may be handed the same free port
        dicom_port = free_port()
    config = root / "orthanc.json"
    config.write_text(json.dumps(_configuration(root, http_port, dicom_port, username, password), indent=2))
    log = log_folder / "orthanc.log"
    prefix = _unprivileged(root)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*prefix, ORTHANC, str(config)], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Orthanc(f"http://127.0.0.1:{http_port}", username, password, log)
    try:

        def system() -> bool:
            return requests.get(f"{server.url}/system", auth=server.auth, timeout=2).status_code == 200

        wait_until_answering(process, system, log, startup_seconds, "Orthanc")
        plugins = requests.get(f"{server.url}/plugins", auth=server.auth, timeout=5).json()
        if "dicom-web" not in plugins:
            pytest.fail(f"Orthanc started without its DICOMweb plugin (plugins: {plugins}):\n{log.read_text()[-3000:]}")
        yield server
    finally:
        stop_process_group(process)
        shutil.rmtree(root, ignore_errors=True)


def upload(server: Orthanc, files: list[bytes]) -> None:
    """Store Part 10 files through Orthanc's REST API (not DICOMweb: the code under test is the DICOMweb client)."""
    for data in files:
        answer = requests.post(f"{server.url}/instances", data=data, auth=server.auth, timeout=30)
        answer.raise_for_status()
        if answer.json().get("Status") not in ("Success", "AlreadyStored"):
            raise AssertionError(f"Orthanc did not store an instance: {answer.json()}")


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 signed by its own key, valid for a day.

    Returns:
        The key and certificate in one PEM (what a TLS server loads), and the certificate alone
        (the CA bundle a client verifies it with).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pneumo test PACS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    return key_pem + certificate_pem, certificate_pem


@contextlib.contextmanager
def tls_front(server: Orthanc, server_pem: Path) -> Iterator[str]:
    """HTTPS in front of ``server``, as a TLS-terminating proxy (nginx, a load balancer) puts it in production.

    Orthanc 1.10.1 as packaged in Debian 12 crashes on its own TLS handshake (``SslEnabled``), so
    TLS ends here and the bytes go on to Orthanc's plain port unchanged. One thread per
    connection relays both directions (a TLS socket is read and written from one thread only).

    Yields:
        The HTTPS base URL that leads to ``server``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem)
    listener = socket.create_server(("127.0.0.1", 0))
    upstream = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))

    def relay(tls: ssl.SSLSocket, backend: socket.socket) -> None:
        with tls, backend:
            while True:
                readable, _, _ = select.select([tls, backend], [], [], 60)
                if not readable:
                    return
                for source in readable:
                    target = backend if source is tls else tls
                    data = source.recv(65536)
                    if not data:
                        return
                    target.sendall(data)
                    while source is tls and tls.pending():
                        backend.sendall(tls.recv(65536))

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            try:
                tls = context.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):  # a client that does not trust the certificate hangs up here
                client.close()
                continue
            threading.Thread(target=relay, args=(tls, socket.create_connection(upstream)), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
