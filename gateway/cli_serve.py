"""``bastion serve``: one flag per setting, generated from the settings model.

Each field of ``gateway.settings.Settings`` becomes ``--field-name`` with the field's type, its
description as help, its default and its environment variable (``BASTION_FIELD_NAME``). A flag
that is not given leaves the setting to the environment, the config file or the default, in
that order; a flag given wins over all three. Booleans are ``--name/--no-name`` pairs and
settings with a fixed set of values are choices, so a typo is a usage error, not a late crash.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from bastion.gateway.settings import Settings, unknown_environment

_SECRETS = ("admin_token", "metrics_token")


def _option(name: str, field: FieldInfo) -> tuple[Any, Any]:
    """The annotation and ``typer.Option`` of one setting's flag."""
    annotation = field.annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    choices = None
    if typing.get_origin(annotation) is typing.Literal:  # typer makes it a choice
        choices = [str(c) for c in typing.get_args(annotation)]
    default = field.default
    shown = "none" if default is None else ("''" if default == "" else str(default))
    if isinstance(default, bool):
        shown = "on" if default else "off"
    help_text = (field.description or "").rstrip(".")
    if name in _SECRETS:
        help_text += ". Prefer the environment variable: a flag shows in the process list"
    help_text += f". Default: {shown}; env BASTION_{name.upper()}."
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{name.replace('_', '-')}"] if annotation is bool else [flag]
    option = typer.Option(
        *decls,
        help=help_text,
        show_default=False,
        metavar=("|".join(choices) if choices else _METAVARS.get(annotation, "VALUE")),
        rich_help_panel=None,
    )
    return annotation, option


_METAVARS = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH", bool: ""}


def serve(config: Path | None = None, **flags: Any) -> None:
    """Serve the model repository over KServe v2 HTTP and gRPC (every setting is a flag)."""
    from pydantic import ValidationError

    from bastion.gateway.server import PortInUse
    from bastion.gateway.server import serve as run_server

    if config is not None:
        os.environ["BASTION_CONFIG_FILE"] = str(config)
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in unknown_environment():
        logging.getLogger("bastion.gateway").warning("%s is not a Bastion setting: ignored", name)
    try:
        run_server(settings)
    except PortInUse as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _signature() -> inspect.Signature:
    config = Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML or JSON settings file (env BASTION_CONFIG_FILE); flags override it.",
            metavar="PATH",
            show_default=False,
        ),
    ]
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=config)
    ]
    for name, field in Settings.model_fields.items():
        annotation, option = _option(name, field)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[annotation | None, option],
            )
        )
    return inspect.Signature(params, return_annotation=None)


serve.__signature__ = _signature()  # type: ignore[attr-defined]
