"""``chatstream export-openvino``: convert a Hugging Face model to an OpenVINO IR directory, and the
commands that make the separate environment the conversion runs in (optimum-intel pins an older
transformers than chatstream needs)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatstream.hookspecs import hookimpl

WEIGHT_FORMATS = ("int8", "int4", "fp16", "fp32")
# The packages whose versions the export environment must share with this one: the IR and its
# converted tokenizer must be readable by the OpenVINO that serves them, and torch is reused.
_SHARED_PACKAGES = ("torch", "openvino", "openvino-tokenizers")


def int4_group_size(*widths: int, preferred: Sequence[int] = (128, 64, 32, 16)) -> int:
    """The largest usual int4 group size that divides every matmul input width (``hidden_size``,
    ``intermediate_size``): 576 for SmolLM2 gives 64, 96 gives 32; -1 (per channel) when none does."""
    for size in preferred:
        if all(width % size == 0 for width in widths):
            return size
    return -1  # per-channel quantization: always valid


def export_command(model: str, out: str, weights: str, group_size: int | None) -> list[str]:
    """The ``optimum-cli export openvino`` command line for these choices."""
    command = ["optimum-cli", "export", "openvino", "--model", model, "--task", "text-generation-with-past"]
    command += ["--weight-format", weights]
    if weights == "int4" and group_size is not None:
        command += ["--group-size", str(group_size), "--ratio", "1.0"]
    return [*command, out]


def _matmul_widths(model: str) -> list[int]:
    """The input widths of the model's linear layers, from its ``config.json`` (empty if unknown)."""
    import json

    try:
        data = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    text_config = data.get("text_config")
    config: dict[str, Any] = text_config if isinstance(text_config, dict) else data
    widths = [config.get("hidden_size"), config.get("intermediate_size")]
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths.append(heads * head_dim)  # the attention output projection's input
    return [w for w in widths if isinstance(w, int) and not isinstance(w, bool) and w > 0]


def _optimum_intel_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.intel") is not None
    except ImportError:  # find_spec imports the parent package, and optimum itself may be missing
        return False


def export_environment_commands(
    venv: str = "~/.venvs/ov-export", constraints: str | None = None
) -> list[str]:
    """Shell commands that make a virtual environment able to run the export.

    The new venv sees this environment's packages after its own: a ``.pth`` file adds this
    interpreter's site-packages (and the ``.pth`` files in them, so an editable chatstream too) at
    the end of its path. That holds where this environment is itself a venv, which
    ``--system-site-packages`` does not (it sees only the base interpreter's). So torch and OpenVINO
    are reused at their installed versions (pinned, so pip downloads neither) and only optimum-intel
    with the older transformers it needs goes into the venv, ahead of ours. optimum-intel also pulls
    torchvision, whose PyPI build does not load next to a CPU-only torch; text models never use it,
    so it is removed when it cannot be imported. ``constraints`` pins the rest (a pip constraints file).
    """
    import shlex
    import sys
    import sysconfig
    from importlib.metadata import PackageNotFoundError, version

    pins: list[str] = []
    for name in _SHARED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{name}=={version(name).split('+', 1)[0]}")
    sites = list(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    pth = "import site; " + "; ".join(f"site.addsitedir({site!r})" for site in sites)
    python, pip = f"{venv}/bin/python", f"{venv}/bin/pip"
    where = f"$({python} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    base = shlex.quote(getattr(sys, "_base_executable", sys.executable))
    pin_file = f" -c {shlex.quote(constraints)}" if constraints else ""
    return [
        f"{base} -m venv {venv}",
        f'printf %s {shlex.quote(pth)} > "{where}/chatstream-main-env.pth"',
        f"{pip} install{pin_file} 'optimum-intel[openvino]' " + " ".join(f"'{pin}'" for pin in pins),
        f"{python} -c 'import torchvision' 2>/dev/null || {pip} uninstall -y torchvision",
    ]


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``chatstream export-openvino``."""
    import click

    @cli.command("export-openvino")
    @click.argument("model")
    @click.argument("out")
    @click.option(
        "--weights",
        type=click.Choice(WEIGHT_FORMATS),
        default="int8",
        show_default=True,
        help="weight compression of the exported IR",
    )
    @click.option(
        "--group-size",
        type=int,
        default=None,
        help="int4 group size (default: the largest of 128/64/32/16 dividing the layer widths)",
    )
    def export_openvino(model: str, out: str, weights: str, group_size: int | None) -> None:
        """Convert a local Hugging Face model directory MODEL to an OpenVINO IR directory OUT
        (the model, its converted tokenizer and detokenizer).

        Needs optimum-intel; without it, prints how to export in a separate environment.
        Serve the result with: chatstream serve --engine openvino --model OUT
        """
        import shlex
        import subprocess
        import sys

        if weights == "int4":
            widths = _matmul_widths(model)
            if group_size is None:
                group_size = int4_group_size(*widths) if widths else 64
            elif group_size > 0 and any(width % group_size for width in widths):
                raise click.BadParameter(
                    f"{group_size} does not divide the layer widths {widths} (config.json): "
                    f"use --group-size {int4_group_size(*widths)}",
                    param_hint="--group-size",
                )
        command = export_command(model, out, weights, group_size)
        if not _optimum_intel_installed():
            venv = "~/.venvs/ov-export"
            steps = "\n".join(f"  {line}" for line in export_environment_commands(venv))
            click.echo(
                "optimum-intel is not installed here (it pins an older transformers than chatstream "
                "needs), so export in a separate virtual environment:\n\n"
                f"{steps}\n  {venv}/bin/{shlex.join(command)}\n\n"
                f"then serve it: chatstream serve --engine openvino --model {shlex.quote(out)}",
                err=True,
            )
            sys.exit(1)
        # The optimum-cli of this interpreter, found without relying on PATH (a venv's python run
        # directly has its bin/ off PATH).
        sys.exit(subprocess.call([sys.executable, "-m", "optimum.commands.optimum_cli", *command[1:]]))
