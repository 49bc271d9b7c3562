"""Test certificates: a trusted CA, a server certificate, and an unknown CA.

Everything is made in memory with trustme; nothing here is fit for
production use. The names cover every way tests reach the test smarthost.
"""

from __future__ import annotations

import datetime
import os
import ssl

import trustme

SERVER_NAMES = ("smarthost.example.org", "localhost", "127.0.0.1", "::1")


class TestPKI:
    """A CA that tests trust, one it does not, and certificates from both."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.ca = trustme.CA(organization_name="relayq test CA")
        self.other_ca = trustme.CA(organization_name="relayq unknown CA")
        self.server_cert = self.ca.issue_cert(*SERVER_NAMES)
        self.wrong_name_cert = self.ca.issue_cert("other.example.net")
        self.unknown_ca_cert = self.other_ca.issue_cert(*SERVER_NAMES)
        self.client_cert = self.ca.issue_cert("client.example.org")
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        self.expired_cert = self.ca.issue_cert(*SERVER_NAMES, not_before=past,
                                               not_after=past + datetime.timedelta(days=90))
        # a CA's own certificate is self-signed: served as a leaf, nobody vouches for it
        self.self_signed = trustme.CA(organization_name="relayq self-signed")

    def server_context(self, which: str = "good", *, require_client_cert: bool = False
                       ) -> ssl.SSLContext:
        """A server context with the 'good', 'wrong-name', 'unknown-ca', 'expired' or
        'self-signed' certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if which == "self-signed":
            with self.self_signed.cert_pem.tempfile() as crt, \
                    self.self_signed.private_key_pem.tempfile() as key:
                ctx.load_cert_chain(crt, key)
            return ctx
        cert = {
            "good": self.server_cert,
            "wrong-name": self.wrong_name_cert,
            "unknown-ca": self.unknown_ca_cert,
            "expired": self.expired_cert,
        }[which]
        cert.configure_cert(ctx)
        if require_client_cert:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def write_ca(self, directory: str, name: str = "ca.pem") -> str:
        """Write the trusted CA's PEM for `ca_file`; return its path."""
        path = os.path.join(directory, name)
        self.ca.cert_pem.write_to_path(path)
        return path

    def write_client_cert(self, directory: str) -> tuple[str, str]:
        """Write the client certificate and key; return (cert_path, key_path)."""
        cert = os.path.join(directory, "client.pem")
        key = os.path.join(directory, "client.key")
        for blob in self.client_cert.cert_chain_pems:
            with open(cert, "ab") as f:
                f.write(blob.bytes())
        self.client_cert.private_key_pem.write_to_path(key)
        return cert, key
