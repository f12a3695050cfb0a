"""Every command's help is complete and in one style: arguments as NAME, help on every option."""

from __future__ import annotations

import re

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from bastion.gateway.cli import app


def commands(command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    found = [(path, command)]
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            found += commands(sub, (*path, name))
    return found


def test_every_option_has_help_and_every_argument_is_shown_upper_case() -> None:
    problems = []
    tree = commands(typer.main.get_command(app))
    assert len(tree) > 25  # the walk really reached the subcommands
    for path, command in tree:
        where = " ".join(("bastion", *path))
        if not (command.help or "").strip():
            problems.append(f"{where}: no help")
        for param in command.params:
            if isinstance(param, TyperArgument) and not (param.metavar or "").isupper():
                problems.append(f"{where} {param.name}: shown as {param.metavar or param.name}")
            if isinstance(param, TyperOption) and not (param.help or "").strip():
                problems.append(f"{where} --{param.name}: no help")
        shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output
        if "``" in shown or "<bool>" in shown or re.search(r"\{[a-z_]+\}", shown):
            problems.append(f"{where}: help shows ``, <bool> or a {{name}}")
    assert not problems, "\n".join(problems)


def test_admin_errors_speak_cli_words() -> None:
    from bastion.gateway.cli_incidents import cli_words

    assert cli_words("400: invalid request: query.status: Input should be 'a'") == (
        "400: invalid request: --status: Input should be 'a'"
    )
    assert cli_words("400: body.older_than_s: bad").startswith("400: --older-than-s")
    refused = cli_words("403: this action needs 'Authorization: Bearer <admin token>'")
    assert refused.endswith("(pass --token, or set BASTION_ADMIN_TOKEN)")
