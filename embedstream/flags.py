"""The command line's shared options, each with its variable and default in its help.

Every flag overrides the `EMBEDSTREAM_*` variable of the same name; with
neither, the Settings default holds. A boolean is a flag that takes no value
(`--insecure`, `--quiet`), so its help shows no type; a repeatable option
shows what one value is (`--model NAME`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from pipeline import PREFIX, Settings

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}
# typer shows a type beside each option; a flag takes no value, so it shows none.
FLAG = ""


def described(name: str, text: str) -> str:
    """Help text ending in the option's variable and default (escaped: rich would eat `[`)."""
    default = _DEFAULTS[name]
    shown = "unset" if default in (None, ()) else "off" if default is False else default
    return f"{text} \\[env: {PREFIX}{name.upper()}; default: {shown}]"


def api_keys_of(raw: str | None) -> tuple[str, ...] | None:
    """`--api-keys a,b` as a tuple of keys (None: the flag was not given)."""
    return None if raw is None else tuple(k.strip() for k in raw.split(",") if k.strip())


RedisUrl = Annotated[str | None, typer.Option(
    help=described("redis_url", "Redis/Valkey URL; unset: the embedded server"),
    show_default=False)]
DataDir = Annotated[Path | None, typer.Option(
    help=described("data_dir", "Where the embedded server keeps its data"), show_default=False)]
Model = Annotated[str | None, typer.Option(
    help=described("model", "sentence-transformers model name or path"), show_default=False)]
Models = Annotated[list[str] | None, typer.Option(
    "--model", metavar="NAME",
    help=described("model", "Model to serve (name or path); repeat it to serve several "
                   "models, each with its own workers; the first is the default"),
    show_default=False)]
Backend = Annotated[str | None, typer.Option(
    help=described("backend", "How workers run the model: auto (the fastest of openvino, "
                   "onnx and torch whose vectors match torch's, measured once per machine), "
                   "onnx (ONNX Runtime fp32), onnx-int8 (quantized, opt-in), openvino, "
                   "openvino-f32, openvino-bf16, torch (sentence-transformers as is), "
                   "or module:Factory"),
    show_default=False)]
Device = Annotated[str | None, typer.Option(
    help=described("device", "auto, cpu, cuda, cuda:1…"), show_default=False)]
Host = Annotated[str | None, typer.Option(help=described("host", "Bind address"),
                                          show_default=False)]
Port = Annotated[int | None, typer.Option(help=described("port", "Port"), show_default=False)]
ApiKeys = Annotated[str | None, typer.Option(
    help=described("api_keys", "Comma-separated API keys; unset: no auth"),
    show_default=False)]
Insecure = Annotated[bool, typer.Option(
    "--insecure", metavar=FLAG,
    help=described("insecure", "Allow a non-loopback bind without API keys"),
    show_default=False)]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning, error")]
LogFormat = Annotated[str, typer.Option(help="text, or json (one object a line, for log "
                                             "shippers)")]

Url = Annotated[str | None, typer.Option(
    help=described("url", "Where the server is"), show_default=False)]
ApiKey = Annotated[str | None, typer.Option(
    help="API key \\[env: first of EMBEDSTREAM_API_KEYS]", show_default=False)]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Write results to a .npy (float32 rows in input order, ids in "
    ".ids.txt beside it; with chunk output also .chunks.npy and .chunks.jsonl) or a .jsonl "
    "file; resumable (state kept beside it); one run at a time per file", show_default=False)]
RetryFor = Annotated[float, typer.Option(
    help="Seconds to keep retrying an unreachable server before exit code 5")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar=FLAG,
                                     help="No progress bar or messages")]



def _bare(option: TyperOption | None) -> TyperOption | None:
    if option is not None:
        option.metavar = FLAG
    return option


class Command(TyperCommand):
    """A command whose `--help`, a flag, shows no value type either."""

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        """The help option, without the `<bool>` typer would show beside it."""
        return _bare(super().get_help_option(ctx))


class Group(TyperGroup):
    """The top command, whose `--help` shows no value type either."""

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        """The help option, without the `<bool>` typer would show beside it."""
        return _bare(super().get_help_option(ctx))
