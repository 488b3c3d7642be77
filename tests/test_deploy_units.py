"""The systemd units under deploy/ pass ``systemd-analyze verify`` (where it is installed).

``verify`` exits 0 on an unknown key or an unparsable value (it only warns), so any line it
prints about our unit counts as a failure; a broken copy of each unit is checked to be refused
the same way. ``verify`` also refuses an ExecStart= binary that does not exist, so the test
verifies a copy whose install paths (/opt/zeromesh/bin/mesh, /opt/myapp/bin/python) are
replaced with this machine's ``mesh`` script and Python.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import REPO

DEPLOY = Path(REPO) / "deploy"
UNITS = sorted(p.name for p in DEPLOY.glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed on this machine (no systemd): "
    "the units are not verified here")


def _installed(text: str) -> str:
    mesh_script = Path(sys.executable).with_name("mesh")
    if not mesh_script.exists():
        mesh_script = Path(shutil.which("mesh") or sys.executable)
    return (text.replace("/opt/zeromesh/bin/mesh", str(mesh_script))
            .replace("/opt/myapp/bin/python", sys.executable))


def verify(unit_text: str, name: str, tmp: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about the unit: its complaints (empty: clean)."""
    assert ANALYZE is not None
    path = tmp / name
    path.write_text(_installed(unit_text))
    r = subprocess.run([ANALYZE, "verify", str(path)], capture_output=True, text=True,
                       timeout=60)
    stem = name.replace("@.service", "@").replace(".service", "")
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if stem in ln or str(tmp) in ln]
    if r.returncode != 0:
        ours.append(f"exit code {r.returncode}: {r.stderr.strip()}")
    return ours


def test_the_units_exist() -> None:
    assert "zeromesh@.service" in UNITS and "myapp.service" in UNITS
    assert (DEPLOY / "zeromesh.env.example").is_file()
    assert (DEPLOY / "zeromesh.sysusers.conf").is_file()


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_hardened_with_its_ipc_dir_outside_private_tmp(name: str) -> None:
    s = _settings((DEPLOY / name).read_text())
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("Restart", "on-failure"), ("KillSignal", "SIGTERM")):
        assert s.get(key) == [value], (name, key, s.get(key))
    assert s.get("StateDirectory") and s.get("RuntimeDirectory") and s.get("TimeoutStopSec")
    ipc = [v.split("=", 1)[1] for v in s.get("Environment", []) if
           v.startswith("ZEROMESH_IPC_DIR=")]
    # PrivateTmp would hide /tmp/zeromesh-UID from other units: ipc lives in the runtime dir
    assert ipc == ["%t/" + s["RuntimeDirectory"][0]], ipc


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(name: str, tmp_path: Path) -> None:
    assert verify((DEPLOY / name).read_text(), name, tmp_path) == []


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
@pytest.mark.parametrize("damage", [
    ("KillSignal=SIGTERM", "KillSignal=SIGNOPE"),
    ("[Service]", "[Service]\nRestrt=on-failure"),
    ("ProtectSystem=strict", "ProtectSystem=very"),
], ids=["bad-signal", "unknown-key", "bad-value"])
def test_verify_refuses_a_broken_copy(name: str, damage: tuple[str, str],
                                      tmp_path: Path) -> None:
    text = (DEPLOY / name).read_text()
    assert damage[0] in text
    assert verify(text.replace(damage[0], damage[1], 1), name, tmp_path) != []


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=value: {line!r}"
            out[key.strip()] = value.strip()
    return out


def test_the_example_env_file_makes_a_valid_command_line() -> None:
    """ExecStart is ``mesh $MESH_ARGS --data-dir DIR`` (systemd splits $MESH_ARGS at
    whitespace): the example's must parse, and every ZEROMESH_ variable must be an option."""
    from mesh.cli import build_parser
    from mesh.cli._node_opts import _SETTINGS

    env = _env_file(DEPLOY / "zeromesh.env.example")
    exec_start = next(v for k, vs in _settings((DEPLOY / "zeromesh@.service").read_text())
                      .items() if k == "ExecStart" for v in vs)
    assert exec_start.split()[1:] == ["$MESH_ARGS", "--data-dir", "%S/zeromesh/%i"]
    args = build_parser().parse_args([*env["MESH_ARGS"].split(), "--data-dir", "/x"])
    assert args.long_running and args.data_dir == "/x"
    text = (DEPLOY / "zeromesh.env.example").read_text()
    named = [ln.lstrip("#").partition("=")[0] for ln in text.splitlines()
             if ln.lstrip("#").startswith("ZEROMESH_")]  # the commented-out ones too
    assert len(named) >= 5
    for key in named:
        assert key[len("ZEROMESH_"):].lower() in _SETTINGS, key
