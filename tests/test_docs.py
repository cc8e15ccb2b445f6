"""Docs that tests keep honest: every CLI command has help text and is in the README."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from crdtsync.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_has_help_and_is_in_readme(name):
    sub = subcommands()[name]
    assert sub.description
    assert len(sub.description) > 40
    assert f"crdtsync {name}" in README
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"crdtsync {name} {action.option_strings[0]} has no help"


def test_readme_has_exactly_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("## ", 1)[0]
    commands = [line for line in setup.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert commands[0].endswith("crdtsync relay")
    assert commands[1].endswith("pytest")
