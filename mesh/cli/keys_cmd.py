"""``mesh keygen`` and ``mesh ca init|sign|revoke``: node keys and the mesh authority."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mesh.errors import ConfigError
from mesh.security.authority import CERT_SUFFIX, Authority
from mesh.security.keys import load_public_key, write_keypair


def _keygen(args: argparse.Namespace) -> int:
    pub, sec = write_keypair(args.dir, args.name, overwrite=args.force)
    key = load_public_key(pub)
    if args.json:
        print(json.dumps({"public_key": key, "public_file": str(pub), "secret_file": str(sec)}))
    else:
        print(f"public key:  {key}")
        print(f"wrote {pub} (0644) and {sec} (0600)")
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    Authority.init(args.dir)
    if args.json:
        print(json.dumps({"dir": args.dir, "public_file": f"{args.dir}/ca.pub",
                          "secret_file": f"{args.dir}/ca.secret"}))
    else:
        print(f"authority created in {args.dir}: give {args.dir}/ca.pub to every node; "
              f"keep {args.dir}/ca.secret (0600) offline")
    return 0


def _ca_sign(args: argparse.Namespace) -> int:
    ca = Authority.open(args.dir)
    key = args.key
    if key is None and args.key_file is None:
        raise ConfigError("give --key Z85 or --key-file <name>.key")
    if key is None:
        key = load_public_key(args.key_file)
    cert = ca.sign(args.node_id, key, roles=args.role or (), permissions=args.allow or (),
                   valid_s=args.days * 86400)
    out = args.out or f"{args.node_id}{CERT_SUFFIX}"
    with open(out, "wb") as f:
        f.write(cert.raw)
    if args.json:
        print(json.dumps({"serial": cert.serial, "node_id": cert.node_id,
                          "public_key": cert.public_key, "not_after": cert.not_after,
                          "file": out}))
    else:
        print(f"serial {cert.serial}: {cert.node_id} key {cert.public_key} until "
              f"{cert.not_after:.0f} -> {out}")
    return 0


def _ca_revoke(args: argparse.Namespace) -> int:
    ca = Authority.open(args.dir)
    crl = ca.revoke(args.serial)
    if args.json:
        print(json.dumps({"revoked": sorted(crl.serials), "file": f"{args.dir}/revoked.crl"}))
    else:
        print(f"revoked serials {sorted(crl.serials)} -> {args.dir}/revoked.crl "
              "(copy it into every node's certs directory)")
    return 0


def register(subparsers: Any) -> None:
    """Add ``keygen`` and ``ca`` to the ``mesh`` command line."""
    p = subparsers.add_parser("keygen", help="write a CURVE keypair (Z85, ZeroMQ format)")
    p.add_argument("--dir", default=".", help="directory (created 0700)")
    p.add_argument("--name", default="node", help="file stem: <name>.key, <name>.key_secret")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_keygen)

    ca = subparsers.add_parser("ca", help="mesh authority: init, sign, revoke")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    c = ca_sub.add_parser("init", help="create an Ed25519 authority")
    c.add_argument("--dir", required=True, help="the new authority directory")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_ca_init)
    c = ca_sub.add_parser("sign", help="sign a node certificate")
    c.add_argument("--dir", required=True, help="the authority directory")
    c.add_argument("--node-id", required=True, help="the node id the certificate is for")
    c.add_argument("--key", help="the node's CURVE public key (Z85)")
    c.add_argument("--key-file", help="the node's <name>.key file")
    c.add_argument("--role", action="append", help="a role (repeatable)")
    c.add_argument("--allow", action="append",
                   help="a permission rule '[!]action:pattern' (repeatable)")
    c.add_argument("--days", type=float, default=365.0, help="validity in days")
    c.add_argument("--out", help="output file (default <node-id>.cert)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_ca_sign)
    c = ca_sub.add_parser("revoke", help="revoke certificates by serial")
    c.add_argument("--dir", required=True, help="the authority directory")
    c.add_argument("serial", type=int, nargs="+", help="serials to revoke (printed by ca sign)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_ca_revoke)
