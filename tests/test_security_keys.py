"""Key files, the mesh authority, permissions, and the `mesh keygen` / `mesh ca` commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from mesh.cli import main as cli_main
from mesh.errors import CertificateError, ConfigError, KeyFileError, PermissionDenied
from mesh.security.authority import Authority, TrustAnchor
from mesh.security.keys import (
    generate_keypair,
    load_keypair,
    load_or_create_keypair,
    load_public_key,
    load_public_keys,
    write_keypair,
)
from mesh.security.perms import Permissions, PermissionTable, parse_rule
from mesh.security.zap import TrustStore
from tests.util import REPO


def test_write_keypair_modes_and_roundtrip(tmp_path: Path) -> None:
    kp = generate_keypair()
    pub, sec = write_keypair(tmp_path / "k", "node", kp)
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert load_keypair(sec) == kp
    assert load_public_key(pub) == kp.public
    assert kp.secret is not None and kp.secret not in pub.read_text()
    assert kp.secret not in repr(kp)


def test_secret_file_0644_refused(tmp_path: Path) -> None:
    _, sec = write_keypair(tmp_path, "node")
    os.chmod(sec, 0o644)
    with pytest.raises(KeyFileError, match="too open") as ei:
        load_keypair(sec)
    assert ei.value.path == str(sec)
    with pytest.raises(KeyFileError):
        load_or_create_keypair(sec)


def test_existing_files_not_overwritten(tmp_path: Path) -> None:
    _, sec = write_keypair(tmp_path, "node")
    before = sec.read_bytes()
    with pytest.raises(KeyFileError, match="exists"):
        write_keypair(tmp_path, "node")
    assert sec.read_bytes() == before


def test_keys_compatible_with_pyzmq_loader(tmp_path: Path) -> None:
    import zmq.auth

    kp = generate_keypair()
    _, sec = write_keypair(tmp_path, "n", kp)
    public, secret = zmq.auth.load_certificate(str(sec))
    assert public.decode() == kp.public and secret is not None and secret.decode() == kp.secret


def test_malformed_key_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.key_secret"
    f.write_text('curve\n    public-key = "short"\n')
    os.chmod(f, 0o600)
    with pytest.raises(KeyFileError, match="Z85"):
        load_keypair(f)


def test_load_public_keys_skips_bad_files(tmp_path: Path) -> None:
    a, _ = write_keypair(tmp_path, "a")
    (tmp_path / "junk.key").write_text("nope")
    keys = load_public_keys(tmp_path)
    assert list(keys) == [load_public_key(a)]


def test_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keygen", "--dir", str(tmp_path), "--name", "n1"]) == 0
    out = capsys.readouterr().out
    kp = load_keypair(tmp_path / "n1.key_secret")
    assert kp.public in out
    assert cli_main(["keygen", "--dir", str(tmp_path), "--name", "n1"]) == 1  # exists
    assert "exists" in capsys.readouterr().err


def test_cli_keygen_console_script(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mesh", "keygen", "--dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "node.key_secret").stat().st_mode) == 0o600


# --- authority -----------------------------------------------------------------------------------


def test_authority_sign_verify_tamper_expire_revoke(tmp_path: Path) -> None:
    ca = Authority.init(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / "ca.secret").stat().st_mode) == 0o600
    kp = generate_keypair()
    cert = ca.sign("n1", kp.public, roles=["sensor"], permissions=["publish:s.*"], valid_s=60)
    anchor = TrustAnchor.from_file(tmp_path / "ca" / "ca.pub")
    ok = anchor.verify(cert.raw)
    assert (ok.node_id, ok.public_key, ok.permissions) == ("n1", kp.public, ("publish:s.*",))
    # tampered: change the key inside the signed body
    body, sig = msgpack.unpackb(cert.raw)
    obj = msgpack.unpackb(body)
    obj["public_key"] = generate_keypair().public
    forged = msgpack.packb([msgpack.packb(obj), sig])
    with pytest.raises(CertificateError) as ei:
        anchor.verify(forged)
    assert ei.value.reason == "signature"
    with pytest.raises(CertificateError) as ei:
        anchor.verify(cert.raw, now=cert.not_after + 1)
    assert ei.value.reason == "expired"
    crl = ca.revoke([cert.serial])
    with pytest.raises(CertificateError) as ei:
        anchor.verify(cert.raw, revoked=crl)
    assert ei.value.reason == "revoked"
    # another authority's signature is refused
    other = TrustAnchor.from_file(Authority.init(tmp_path / "ca2").directory / "ca.pub")
    with pytest.raises(CertificateError, match="signature"):
        other.verify(cert.raw)
    with pytest.raises(CertificateError, match="malformed"):
        anchor.verify(b"\x93garbage")


def test_authority_refuses_open_secret_and_second_init(tmp_path: Path) -> None:
    Authority.init(tmp_path)
    with pytest.raises(KeyFileError, match="exists"):
        Authority.init(tmp_path)
    os.chmod(tmp_path / "ca.secret", 0o640)
    with pytest.raises(KeyFileError, match="too open"):
        Authority.open(tmp_path)


def test_cli_ca_init_sign_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "n1.cert"
    assert cli_main(["keygen", "--dir", str(tmp_path), "--name", "n1"]) == 0
    assert cli_main(["ca", "init", "--dir", str(ca_dir)]) == 0
    assert cli_main(["ca", "sign", "--dir", str(ca_dir), "--node-id", "n1", "--key-file",
                     str(tmp_path / "n1.key"), "--allow", "subscribe:*", "--out", str(out)]) == 0
    anchor = TrustAnchor.from_file(ca_dir / "ca.pub")
    cert = anchor.verify(out.read_bytes())
    assert cert.public_key == load_public_key(tmp_path / "n1.key")
    assert cli_main(["ca", "revoke", "--dir", str(ca_dir), str(cert.serial)]) == 0
    crl = anchor.verify_crl((ca_dir / "revoked.crl").read_bytes())
    assert cert.serial in crl.serials
    assert cli_main(["ca", "sign", "--dir", str(ca_dir), "--node-id", "x", "--key", "bad"]) == 1
    assert "Z85" in capsys.readouterr().err


# --- trust store (the ZAP decision), no sockets --------------------------------------------------


def test_trust_store_allowlist_reloads(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.mkdir()
    kp = generate_keypair()
    store = TrustStore(allowlist_dir=allow)
    assert not store.allowed(kp.public)
    write_keypair(tmp_path / "k", "a", kp)
    (allow / "a.key").write_text((tmp_path / "k" / "a.key").read_text())
    assert store.allowed(kp.public)
    (allow / "a.key").unlink()
    assert not store.allowed(kp.public)
    assert store.counters["zap_refused_unknown"] == 2


def test_trust_store_certificates(tmp_path: Path) -> None:
    ca = Authority.init(tmp_path / "ca")
    certs = tmp_path / "certs"
    certs.mkdir()
    now = [1_000_000.0]
    store = TrustStore(anchor=TrustAnchor.from_file(ca.directory / "ca.pub"), certs_dir=certs,
                       clock=lambda: now[0])
    good, old, gone = generate_keypair(), generate_keypair(), generate_keypair()
    c1 = ca.sign("good", good.public, valid_s=100, not_before=now[0] - 1)
    (certs / "good.cert").write_bytes(c1.raw)
    (certs / "old.cert").write_bytes(ca.sign("old", old.public, valid_s=10,
                                             not_before=now[0] - 1).raw)
    c3 = ca.sign("gone", gone.public, valid_s=100, not_before=now[0] - 1)
    (certs / "gone.cert").write_bytes(c3.raw)
    assert store.allowed(good.public) and store.allowed(old.public) and store.allowed(gone.public)
    assert store.key_of_node("good") == good.public
    now[0] += 20  # old expires: refused at the handshake even without a reload
    assert not store.allowed(old.public)
    assert store.counters["zap_refused_expired"] == 1
    (certs / "revoked.crl").write_bytes(ca.revoke([c3.serial]).raw)
    assert not store.allowed(gone.public)
    assert store.allowed(good.public)
    (certs / "revoked.crl").write_bytes(b"forged")  # an untrusted CRL fails closed
    assert not store.allowed(good.public)


# --- permissions (pure) ----------------------------------------------------------------------


def test_permissions_deny_by_default_and_deny_wins() -> None:
    p = Permissions(["publish:sensors.*", "!publish:sensors.secret", "subscribe:*"])
    assert p.allows("publish", "sensors.t1")
    assert not p.allows("publish", "sensors.secret")
    assert not p.allows("publish", "other")
    assert not p.allows("replay", "sensors.t1")
    assert Permissions().allows("subscribe", "x") is False
    t = PermissionTable({"*": ["subscribe:public.*"], "n1": ["*:*", "!serve:admin"]})
    assert t.allows(["n1", None], "serve", "billing")
    assert not t.allows(["n1", None], "serve", "admin")
    assert t.allows(["n2", None], "subscribe", "public.x")
    with pytest.raises(PermissionDenied) as ei:
        t.check(["n2", "KEY"], "push", "jobs")
    assert (ei.value.principal, ei.value.action, ei.value.resource) == ("n2", "push", "jobs")


@pytest.mark.parametrize("rule", ["publish", "fly:x", "publish:", 3])
def test_bad_rules(rule: object) -> None:
    with pytest.raises(ConfigError):
        parse_rule(rule)  # type: ignore[arg-type]
    assert parse_rule("!*:a").allow is False
