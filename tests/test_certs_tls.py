"""Certificates and the SNI map: what is served for which name, and what a bad file does.

TLS handshakes here are real OpenSSL handshakes, pumped between two memory BIOs.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat

import pytest
from cryptography import x509
from OpenSSL import SSL

from proxy import pki
from proxy.certs import CertificateStore, certificate_files
from proxy.config import parse_config
from proxy.tls import ServerTLS, normalise_server_name

NOW = datetime.datetime(2026, 11, 22, 10, 0, tzinfo=datetime.UTC)


def make_pair(directory, name, not_after=NOW + datetime.timedelta(days=90), key=None):
    """Write ``name.pem`` (self-signed leaf) and ``name.key``; return their paths."""
    cert, key = pki.self_signed(name, NOW - datetime.timedelta(days=100), not_after, key=key)
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(pki.cert_pem(cert))
    with open(key_path, "wb") as f:
        f.write(pki.key_pem(key))
    return cert_path, key_path, cert


def config_for(tmp_path, domains: str):
    return parse_config(f"state_dir: {tmp_path / 'state'}\ndomains:\n{domains}", str(tmp_path / "t.yaml"))


def serial_served(server_tls: ServerTLS, server_name: bytes | None) -> int:
    """Handshake in memory with ``server_name`` as SNI; the leaf serial the server sent."""
    client = handshake(server_tls, server_name)
    return client.get_peer_certificate().get_serial_number()


def handshake(
    server_tls: ServerTLS,
    server_name: bytes | None,
    client_ctx: SSL.Context | None = None,
) -> SSL.Connection:
    """A real TLS handshake pumped between memory BIOs; returns the client connection."""
    client = SSL.Connection(client_ctx or SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    if server_name is not None:
        client.set_tlsext_host_name(server_name)
    client.set_connect_state()
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                if a is client:
                    raise  # what the client saw: the test asserts on it
            while True:
                try:
                    data = a.bio_read(65536)
                except SSL.WantReadError:
                    break
                b.bio_write(data)
        if client.get_peer_certificate() is not None:
            return client
    raise AssertionError("handshake did not complete")


def test_self_signed_certificate_is_made_once_and_kept_across_restarts(tmp_path):
    config = config_for(tmp_path, "  track.example.com: {certificate: self-signed}\n")
    first = CertificateStore(lambda: NOW).load(config)["track.example.com"]
    cert_path, key_path = certificate_files(config, config.domains["track.example.com"])
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    pem = open(cert_path, "rb").read()
    second = CertificateStore(lambda: NOW).load(config)["track.example.com"]
    assert open(cert_path, "rb").read() == pem
    assert (first.status, first.source, second.status) == ("valid", "self-signed", "valid")
    assert x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["track.example.com"]


def test_sni_chooses_each_domains_certificate_and_refuses_other_names(tmp_path):
    _, _, a = make_pair(tmp_path, "a.example.com")
    _, _, b = make_pair(tmp_path, "b.example.com")
    config = config_for(
        tmp_path,
        f"  a.example.com: {{certificate: {{cert: {tmp_path}/a.example.com.pem, key: {tmp_path}/a.example.com.key}}}}\n"
        f"  b.example.com: {{certificate: {{cert: {tmp_path}/b.example.com.pem, key: {tmp_path}/b.example.com.key}}}}\n",
    )
    store = CertificateStore(lambda: NOW)
    store.load(config)
    server_tls = ServerTLS()
    server_tls.set_contexts(store.contexts())
    assert serial_served(server_tls, b"a.example.com") == a.serial_number
    assert serial_served(server_tls, b"B.Example.Com.") == b.serial_number
    for name in (b"c.example.com", None):
        with pytest.raises(SSL.Error, match="unrecognized name"):
            serial_served(server_tls, name)


def test_a_corrupt_replacement_keeps_the_previous_certificate_serving(tmp_path):
    cert_path, key_path, original = make_pair(tmp_path, "a.example.com")
    config = config_for(tmp_path, f"  a.example.com: {{certificate: {{cert: {cert_path}, key: {key_path}}}}}\n")
    store = CertificateStore(lambda: NOW)
    store.load(config)
    with open(cert_path, "wb") as f:
        f.write(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    state = store.load(config)["a.example.com"]
    assert state.status == "valid" and state.last_error
    server_tls = ServerTLS()
    server_tls.set_contexts(store.contexts())
    assert serial_served(server_tls, b"a.example.com") == original.serial_number


def test_a_new_good_file_replaces_the_served_certificate(tmp_path):
    cert_path, key_path, _ = make_pair(tmp_path, "a.example.com")
    config = config_for(tmp_path, f"  a.example.com: {{certificate: {{cert: {cert_path}, key: {key_path}}}}}\n")
    store = CertificateStore(lambda: NOW)
    store.load(config)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    new_cert, new_key, replacement = make_pair(fresh, "a.example.com")
    shutil.copy(new_key, key_path)
    shutil.copy(new_cert, cert_path)
    os.utime(cert_path, ns=(1, os.stat(cert_path).st_mtime_ns + 1_000_000))
    state = store.load(config)["a.example.com"]
    assert state.last_error is None
    server_tls = ServerTLS()
    server_tls.set_contexts(store.contexts())
    assert serial_served(server_tls, b"a.example.com") == replacement.serial_number


def test_a_key_that_does_not_match_fails_with_a_readable_reason(tmp_path):
    cert_path, _, _ = make_pair(tmp_path, "a.example.com")
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key, _ = make_pair(other, "a.example.com")
    config = config_for(tmp_path, f"  a.example.com: {{certificate: {{cert: {cert_path}, key: {wrong_key}}}}}\n")
    state = CertificateStore(lambda: NOW).load(config)["a.example.com"]
    assert state.status == "failed" and state.context is None
    assert "does not match" in state.last_error


def test_a_missing_file_fails_naming_the_file(tmp_path):
    config = config_for(tmp_path, f"  a.example.com: {{certificate: {{cert: {tmp_path}/nope.pem, key: {tmp_path}/nope.key}}}}\n")
    state = CertificateStore(lambda: NOW).load(config)["a.example.com"]
    assert state.status == "failed" and "nope.pem does not exist" in state.last_error


def test_an_expired_certificate_is_still_served_with_status_expired(tmp_path):
    cert_path, key_path, _ = make_pair(tmp_path, "a.example.com", not_after=NOW - datetime.timedelta(days=1))
    config = config_for(tmp_path, f"  a.example.com: {{certificate: {{cert: {cert_path}, key: {key_path}}}}}\n")
    state = CertificateStore(lambda: NOW).load(config)["a.example.com"]
    assert state.status == "expired" and state.context is not None


def test_acme_domain_without_issued_files_is_inactive_and_none_serves_nothing(tmp_path):
    config = config_for(tmp_path, "  a.example.com: {certificate: acme}\n  b.example.com: {certificate: none}\n")
    states = CertificateStore(lambda: NOW).load(config)
    assert (states["a.example.com"].status, states["b.example.com"].status) == ("inactive", "inactive")
    assert states["a.example.com"].context is None and states["b.example.com"].source == "none"


def served_tls(tmp_path) -> ServerTLS:
    cert_path, key_path, _ = make_pair(tmp_path, "a.example.com")
    config = config_for(tmp_path, f"  a.example.com: {{certificate: {{cert: {cert_path}, key: {key_path}}}}}\n")
    store = CertificateStore(lambda: NOW)
    store.load(config)
    server_tls = ServerTLS()
    server_tls.set_contexts(store.contexts())
    return server_tls


@pytest.mark.parametrize("cipher", [b"AES128-SHA", b"AES256-SHA256", b"ECDHE-RSA-AES128-SHA", b"DES-CBC3-SHA", b"ECDHE-ECDSA-AES128-SHA", b"ECDHE-ECDSA-AES256-SHA", b"ECDHE-ECDSA-AES128-SHA256", b"ECDHE-ECDSA-AES256-SHA384"])
def test_tls12_clients_offering_only_legacy_ciphers_are_refused(tmp_path, cipher):
    server_tls = served_tls(tmp_path)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    try:
        ctx.set_cipher_list(cipher + b":@SECLEVEL=0")
    except SSL.Error:
        pytest.skip(f"this OpenSSL no longer offers {cipher!r} at all")
    with pytest.raises(SSL.Error):
        handshake(server_tls, b"a.example.com", ctx)


def test_tls12_client_with_a_modern_cipher_is_served(tmp_path):
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
    client = handshake(served_tls(tmp_path), b"a.example.com", ctx)
    assert client.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest.mark.parametrize(
    "raw, expected", [(b"Track.Example.com.", "track.example.com"), (None, None), (b"", None), (b"\xff", None)]
)
def test_server_name_normalisation(raw, expected):
    assert normalise_server_name(raw) == expected


def many_domains(tmp_path, count):
    lines = []
    serials = {}
    for i in range(count):
        name = f"d{i}.example.com"
        _, _, cert = make_pair(tmp_path, name)
        serials[name] = cert.serial_number
        lines.append(f"  {name}: {{certificate: {{cert: {tmp_path}/{name}.pem, key: {tmp_path}/{name}.key}}}}\n")
    return config_for(tmp_path, "".join(lines)), serials


def test_a_context_is_built_at_its_names_first_handshake_only(tmp_path):
    config, serials = many_domains(tmp_path, 3)
    store = CertificateStore(lambda: NOW)
    store.load(config)
    assert not any(pair.built for pair in store.contexts().values()), "nothing built at load"
    server_tls = ServerTLS()
    server_tls.set_contexts(store.contexts())
    assert serial_served(server_tls, b"d1.example.com") == serials["d1.example.com"]
    assert [name for name, pair in store.contexts().items() if pair.built] == ["d1.example.com"]


def test_only_the_most_recently_used_contexts_stay_built(tmp_path, monkeypatch):
    import proxy.tls

    monkeypatch.setattr(proxy.tls, "MAX_BUILT_CONTEXTS", 2)
    config, serials = many_domains(tmp_path, 3)
    store = CertificateStore(lambda: NOW)
    store.load(config)
    server_tls = ServerTLS()
    server_tls.set_contexts(store.contexts())
    for name in ("d0.example.com", "d1.example.com", "d2.example.com"):
        assert serial_served(server_tls, name.encode()) == serials[name]
    built = {name for name, pair in store.contexts().items() if pair.built}
    assert built == {"d1.example.com", "d2.example.com"}
    assert serial_served(server_tls, b"d0.example.com") == serials["d0.example.com"], "built again"


def test_a_reread_of_unchanged_files_keeps_the_checked_pair(tmp_path):
    config, _ = many_domains(tmp_path, 1)
    store = CertificateStore(lambda: NOW)
    first = store.load(config)["d0.example.com"].context
    again = store.load(config, reread=True)["d0.example.com"].context
    assert again is first, "the same bytes are not parsed again"
    make_pair(tmp_path, "d0.example.com")
    assert store.load(config, reread=True)["d0.example.com"].context is not first


def complete_handshake(server_tls, client_ctx, session=None):
    """A TLS 1.2 handshake pumped to its end in memory; the client connection."""
    client = SSL.Connection(client_ctx, None)
    client.set_tlsext_host_name(b"a.example.com")
    if session is not None:
        client.set_session(session)
    client.set_connect_state()
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            if not done[id(a)]:
                try:
                    a.do_handshake()
                    done[id(a)] = True
                except SSL.WantReadError:
                    pass
            while True:
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    break
        if all(done.values()):
            return client
    raise AssertionError("handshake did not complete")


def test_session_keys_are_replaced_and_old_sessions_no_longer_resume(tmp_path):
    server_tls = served_tls(tmp_path)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    first = complete_handshake(server_tls, ctx)
    session = first.get_session()
    # TLS 1.2: a resumed session keeps its master secret; a full handshake makes a new one.
    again = complete_handshake(server_tls, ctx, session)
    assert again.master_key() == first.master_key(), "resumed before the rotation"
    server_tls.rotate_session_keys()
    after = complete_handshake(server_tls, ctx, session)
    assert after.master_key() != first.master_key(), "a ticket from the previous keys does not resume"
