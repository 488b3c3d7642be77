"""The CLI on a secured mesh, and its option sources: real `mesh` processes on loopback.

`mesh keygen` writes the keys, `--allowlist`/`--key-file`/`--peer-key` (or the same from
`$ZEROMESH_*` and a `--config` TOML file) turn CURVE on; a plaintext command that reaches only
CURVE nodes says so; bad numbers are one usage line, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli_observe import LOOP, Bg, ce_text, mesh
from tests.util import unique


def _keys(tmp: Path) -> Path:
    keys = tmp / "keys"
    for name in ("sub", "pub"):
        r = mesh("keygen", "--dir", str(keys), "--name", name)
        assert r.returncode == 0, r.stderr
    return keys


def _pubkey(keys: Path, name: str) -> str:
    from mesh.security.keys import load_public_key

    return load_public_key(keys / f"{name}.key")


def test_pub_and_sub_over_curve_with_flags_env_and_config(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    topic = unique("secure.t")
    m = unique("m")
    # the subscriber takes its security from the environment, the publisher from a file
    env = {"ZEROMESH_KEY_FILE": str(keys / "sub.key_secret"), "ZEROMESH_ALLOWLIST": str(keys)}
    sub = Bg("sub", topic, "--count", "1", "--timeout", "30", "--json", "--mesh", m, *LOOP,
             tmp=tmp_path, env=env)
    try:
        ep = sub.endpoint()
        cfg = tmp_path / "pub.toml"
        cfg.write_text(f'key_file = "{keys / "pub.key_secret"}"\nallowlist = "{keys}"\n'
                       f'peer = ["{ep}"]\npeer_key = ["{ep}={_pubkey(keys, "sub")}"]\n')
        r = mesh("pub", topic, "over-curve", "--config", str(cfg), "--mesh", m, *LOOP,
                 "--wait", "10", "--linger", "5")
        assert r.returncode == 0, r.stderr
        rc, out, err = sub.finish()
        assert rc == 0, err
        ev = json.loads(out.splitlines()[0])
        assert ce_text(ev) == "over-curve" and ev["meshstream"] == topic
    finally:
        sub.stop()


def test_a_plaintext_command_against_a_curve_mesh_says_what_is_missing(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    m = unique("m")
    sub = Bg("sub", unique("t"), "--timeout", "30", "--mesh", m, *LOOP, "--key-file",
             str(keys / "sub.key_secret"), "--allowlist", str(keys), tmp=tmp_path)
    try:
        ep = sub.endpoint()
        r = mesh("call", "nothing", "x", "--timeout", "2", "--peer", ep, "--mesh", m, *LOOP)
        assert r.returncode == 1
        assert "no plaintext peer answered" in r.stderr and "--key-file" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        sub.stop()


def test_security_and_number_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    cases = [
        (["sub", "x.", "--metrics-port", "99999"], 2, "0-65535"),
        (["sub", "x.", "--metrics-port", "-5"], 2, "0-65535"),
        (["pub", "x", "d", "--metrics-port", "nope"], 2, "not a port"),
        (["call", "s", "d", "--key-file", str(keys / "pub.key_secret")], 1,
         "--allowlist DIR or --authority DIR"),
        (["call", "s", "d", "--allow", "call:*"], 1, "needs CURVE"),
        (["call", "s", "d", "--allowlist", str(tmp_path / "none")], 1, "not a directory"),
        (["call", "s", "d", "--allowlist", str(keys), "--peer-key", "nokey"], 1,
         "ENDPOINT=KEY"),
    ]
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text('colour = "blue"\n')
    cases.append((["call", "s", "d", "--config", str(bad_cfg)], 1, "unknown option(s) colour"))
    for argv, code, text in cases:
        r = mesh(*argv, *LOOP)
        assert r.returncode == code, (argv, r.returncode, r.stderr)
        assert text in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr, (argv, r.stderr)
    env_bad = mesh("call", "s", "d", *LOOP, env={"ZEROMESH_METRICS_PORT": "70000"})
    assert env_bad.returncode == 1 and "0-65535" in env_bad.stderr, env_bad.stderr


def test_more_mistakes_each_one_line_and_non_zero(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    r = mesh("ca", "init", "--dir", str(ca), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["public_file"].endswith("ca.pub")
    qdir = tmp_path / "node"
    qdir.mkdir()
    cases = [
        (["ca", "revoke", "--dir", str(ca), "7"], 1, "never issued"),
        (["dlq", "list", str(tmp_path / "missing"), "q"], 1, "no such data directory"),
        (["dlq", "list", str(qdir), "q"], 1, "no queue 'q'"),
        (["sub", "bad topic!", "--timeout", "1"], 1, "not a stream name or prefix"),
        (["stats", "--port", "1", "--watch", "--interval", "0"], 2, "seconds"),
    ]
    for argv, code, text in cases:
        r = mesh(*argv, *(LOOP if argv[0] == "sub" else ()))
        assert r.returncode == code, (argv, r.returncode, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
    r = mesh("keygen", "--dir", str(tmp_path / "k"), "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["public_key"]) == 40
