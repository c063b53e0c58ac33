"""The ``supir-rt`` command: a table of sub-commands, each a parser builder and a run function in its module.

`COMMANDS` names every sub-command, its one-line help and where its parser lives. Only the sub-command
being run is imported (and with it torch, for the commands that load the model), so ``supir-rt --help``
and ``supir-rt --version`` import neither torch nor the serving stacks.

A bad option, input or setup (any `supir_rt.errors.UserError`) gives one ``error: ...`` line naming the
flag as typed (exit code 2); anything else is a bug and shows its traceback. ``--debug`` shows tracebacks
for user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from typing import Any

# Names that were public in the single-module CLI, now in `supir_rt.cli.restore` / `supir_rt.runtime`
# (imported on first use, so that ``supir-rt --help`` imports neither).
_MOVED = {
    **{name: "supir_rt.cli.restore" for name in (
        "DEFAULT_OUTPUT_DIR", "RESTORE_EXAMPLES", "SETTING_FLAGS", "Job", "add_restore_parser", "collect_inputs",
        "make_captioner_from_args", "plan_jobs", "restore_config_from_args", "build_restorer", "run_restore")},
    **{name: "supir_rt.runtime" for name in (
        "ENV_CONFIG", "ENV_SDXL", "ENV_SUPIR", "ENV_WEIGHTS_DIR", "TINY_DEFAULTS", "WeightPaths",
        "WeightsNotFoundError", "add_runtime_options", "default_config_path", "default_weights_dir",
        "find_weights", "read_config_file", "weights_help")},
}

# name -> (one-line help, module, function that adds the sub-command's parser)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "restore": ("restore images with SUPIR", "supir_rt.cli.restore", "add_restore_parser"),
    "caption": ("caption images with LLaVA-1.5 over ONNX Runtime", "supir_rt.caption.cli", "add_caption_parser"),
    "ui": ("a browser page for restoring photos (Gradio)", "supir_rt.ui.cli", "add_ui_parser"),
    "serve": ("serve the HTTP API with Ray Serve (local, Ray cluster, KubeRay)", "supir_rt.serve.cli",
              "add_serve_parser"),
    "triton-repo": ("write a Triton Inference Server model repository (Python backend)", "supir_rt.serve.cli",
                    "add_triton_repo_parser"),
    "triton": ("serve the model through PyTriton (the Triton server bundled in nvidia-pytriton)",
               "supir_rt.serve.cli", "add_triton_parser"),
}
EPILOG = ("examples:\n  supir-rt restore photo.jpg -o restored.png\n  supir-rt restore --help      every restore "
          "option, with examples\n  supir-rt caption photo.jpg --model-dir llava-13b-onnx")


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


class _ProgressAwareHandler(logging.StreamHandler):
    """Erases the progress status line before a log line, so that the two do not mix."""

    def emit(self, record: logging.LogRecord) -> None:
        from supir_rt.progress import active as active_progress

        progress = active_progress()
        if progress is not None:
            progress.clear()
        super().emit(record)


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``supir-rt`` parser with every sub-command (``"*"``), or with only ``command`` built in full:
    the others get a placeholder parser (their help line only), so that building it imports only what
    ``command`` needs (None: placeholders only, for ``supir-rt --help``)."""
    from supir_rt import __version__

    parser = argparse.ArgumentParser(prog="supir-rt", description="SUPIR image restoration runtime", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"supir-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_line, module, function) in COMMANDS.items():
        if name != command and command != "*":
            sub.add_parser(name, help=help_line)
            continue
        try:
            add = getattr(importlib.import_module(module), function)
        except ImportError:  # an optional part (captioning) that is not installed
            continue
        add(sub)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo after the sub-command: show that sub-command's usage, not the top-level one
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        (commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(message)s"))
    root = logging.getLogger("supir_rt")
    saved = root.handlers[:], root.level, root.propagate
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    root.propagate = False
    try:
        return args.func(args)
    finally:  # the CLI's logging lasts as long as the command: embedding processes keep theirs
        root.handlers[:], root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'supir_rt.cli' has no attribute {name!r}")


__all__ = ["COMMANDS", "build_parser", "main"]
