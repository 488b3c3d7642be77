"""Every command's help: a description for every command, option and argument, no reST
markup, defaults shown; `mesh --version` does not import the commands."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from mesh.cli import build_parser
from tests.util import REPO


def _parsers(p: argparse.ArgumentParser, path: str = "mesh"
             ) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, child in a.choices.items():
                assert helps.get(name), f"{path} {name}: no one-line help"
                out += _parsers(child, f"{path} {name}")
    return out


def test_every_command_and_option_is_described_without_markup() -> None:
    missing, markup = [], []
    for path, p in _parsers(build_parser()):
        text = p.format_help()
        if re.search(r"``|:(func|class|meth|mod|data|attr):`", text):
            markup.append(path)
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction,
                              argparse._VersionAction)) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    assert not markup, markup
    assert not missing, missing


def test_defaults_are_shown() -> None:
    text = dict(_parsers(build_parser()))["mesh call"].format_help()
    assert re.search(r"--timeout.*\(default", text.replace("\n", " "))


def test_version_is_quick_to_import() -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mesh", "--version"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("zeromesh ")
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines()}
    assert not imported & {"mesh.node", "mesh.log", "zmq", "zeroconf", "mesh.cli.pubsub_cmd"}, \
        sorted(imported & {"mesh.node", "mesh.log", "zmq", "zeroconf", "mesh.cli.pubsub_cmd"})


def test_every_command_takes_json() -> None:
    lacking = [path for path, p in _parsers(build_parser())
               if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
               and path != "mesh" and "--json" not in p._option_string_actions]
    assert not lacking, lacking


def _readme_block() -> list[str]:
    import pathlib

    text = (pathlib.Path(REPO) / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    return [ln for ln in block.splitlines() if ln.startswith("mesh ")]


def test_the_readme_command_list_matches_the_parser() -> None:
    """Every command the parser has is in README's Command line block, every command and
    option the block shows exists (so the two cannot drift apart silently)."""
    parsers = dict(_parsers(build_parser()))
    top = {path.split()[1] for path in parsers if len(path.split()) == 2}
    shown: set[str] = set()
    for line in _readme_block():
        for part in line.split("#", 1)[0].split("  |  "):
            words = part.split()
            if len(words) < 2 or words[0] != "mesh" or words[1].startswith("-"):
                continue
            cmd = words[1]
            shown.add(cmd)
            assert f"mesh {cmd}" in parsers, f"README shows unknown command {cmd!r}"
            opts = {w.strip("[]|(),").split("=")[0] for w in words if w.strip("[]").startswith("--")}
            known = set()
            for path, p in parsers.items():
                if path == f"mesh {cmd}" or path.startswith(f"mesh {cmd} "):
                    known |= set(p._option_string_actions)
            assert opts <= known, (cmd, opts - known)
    assert top <= shown, f"commands missing from README: {sorted(top - shown)}"


def test_the_readme_command_list_is_the_generated_one() -> None:
    """README's block between the markers is exactly what `python -m mesh.cli._readme`
    writes from the parser (run it after changing a command)."""
    import pathlib

    from mesh.cli._readme import rewrite

    text = (pathlib.Path(REPO) / "README.md").read_text()
    assert rewrite(text) == text, "README.md's command list is stale: run " \
        "python -m mesh.cli._readme"


def test_the_readme_script_rewrites_only_the_block() -> None:
    from mesh.cli._readme import BEGIN, END, rewrite

    stale = f"# x\n{BEGIN}\n```\nmesh gone\n```\n{END}\nrest\n"
    fresh = rewrite(stale)
    assert "mesh gone" not in fresh and "mesh pub TOPIC DATA" in fresh
    assert fresh.endswith(f"{END}\nrest\n") and rewrite(fresh) == fresh
