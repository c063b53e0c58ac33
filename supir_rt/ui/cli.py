"""``supir-rt ui``: serve the restoration page on this machine (Gradio), the model loaded once.

Every file the server writes (uploads, Gradio's cache, the restored PNGs) goes to one temporary folder
that is removed when the server stops (Ctrl+C or SIGTERM). Weights, backend and device options are the
``restore`` command's (`supir_rt.runtime.add_runtime_options`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("supir_rt")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_ui_parser(subparsers: Any) -> None:
    from supir_rt.runtime import add_runtime_options

    p = subparsers.add_parser(
        "ui",
        help="a browser page for restoring photos (Gradio)",
        description="Serve a page to restore photos in the browser: upload, stage 1, caption, presets and "
        "knobs, before/after slider, PNG download with the settings, reproduce from a PNG. See docs/ui.md.",
        epilog="example: supir-rt ui --tiny-random   (then open http://127.0.0.1:7860)",
    )
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--queue-size", type=int, default=16,
                   help="most jobs waiting their turn; more are refused with 'queue full' (default 16)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest upload in MB (default 200)")
    c = p.add_argument_group("captions (default: the caption is typed in the page)")
    c.add_argument("--captioner", choices=("none", "llava", "hf"), default=None,
                   help="llava (needs --llava-dir) or hf (needs --caption-model) adds a caption button")
    c.add_argument("--llava-dir", type=Path, default=None, help="exported LLaVA folder for --captioner llava")
    c.add_argument("--caption-model", type=Path, default=None,
                   help="transformers image-text-to-text model folder for --captioner hf (e.g. SmolVLM)")
    add_runtime_options(p)
    p.set_defaults(func=run_ui, caption=None)


def check_ui_args(args: argparse.Namespace) -> None:
    from supir_rt.errors import SetupError

    if not 1 <= args.port <= 65535:
        raise SetupError(f"--port {args.port}: use a port number in 1..65535")
    if args.queue_size < 1:
        raise SetupError(f"--queue-size {args.queue_size}: at least 1 job must be able to wait")
    if args.max_upload_mb < 1:
        raise SetupError(f"--max-upload-mb {args.max_upload_mb}: use at least 1")
    if args.captioner == "llava" and args.llava_dir is None:
        raise SetupError("--captioner llava needs --llava-dir DIR (the exported LLaVA folder)")
    if args.captioner == "hf" and args.caption_model is None:
        raise SetupError("--captioner hf needs --caption-model DIR (a transformers image-text-to-text model folder)")
    try:
        import gradio  # noqa: F401
    except ImportError as err:  # gradio itself, or a broken dependency of it (say pandas after a numpy change)
        raise SetupError(f"the UI needs the ui extra: pip install 'supir-rt[ui]' (importing gradio failed: {err})") from None
    check_address(args.host, args.port)


def check_address(host: str, port: int) -> None:
    """Fail before the model loads when ``host:port`` cannot be listened on (busy port, unknown address)."""
    from supir_rt.errors import SetupError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            reason = err.strerror or str(err)
            raise SetupError(f"cannot listen on {host}:{port} ({reason}); pass another --port, or a --host "
                             "address of this machine") from None


def run_ui(args: argparse.Namespace) -> int:
    """The ``ui`` sub-command: returns the exit code (0 after a clean stop, 2 for bad options or setup)."""
    from supir_rt.errors import UserError
    from supir_rt.runtime import TINY_DEFAULTS, build_restorer, options_from_args, read_config_file
    from supir_rt.runtime import report_error as _error

    errors = (UserError,)
    workdir = Path(tempfile.mkdtemp(prefix="supir-rt-ui-"))
    saved_env = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED", "MPLCONFIGDIR")}
    saved_tempdir = tempfile.tempdir
    restorer = app = None
    try:
        # Before Gradio is imported: it reads its cache folder from the environment at import time.
        os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        # Gradio imports matplotlib around every event; its config and font cache would go to the home folder.
        os.environ.setdefault("MPLCONFIGDIR", str(workdir / "matplotlib"))
        (workdir / "tmp").mkdir()
        tempfile.tempdir = str(workdir / "tmp")  # uploads being received, and any library's temporary files
        try:
            check_ui_args(args)
            file_cfg = read_config_file(args.config)
            if args.tiny_random and not args.quiet:
                print("note: --tiny-random runs the tiny configuration with RANDOM weights: the page shows the "
                      "pipeline working, its output is NOT a restoration.", file=sys.stderr)
            restorer = build_restorer(options_from_args(args, file_cfg), progress=False,
                                      **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}))
        except errors as err:
            if args.debug:
                raise
            _error(err)
            return 2

        from supir_rt.ui.callbacks import RestoreUI
        from supir_rt.ui.layout import CSS, build_app

        ui = RestoreUI(restorer, workdir, defaults=TINY_DEFAULTS if args.tiny_random else {})
        app = build_app(ui)
        app.queue(max_size=args.queue_size, default_concurrency_limit=1)
        try:
            app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                       show_error=False, quiet=True, max_file_size=args.max_upload_mb * 1024 * 1024,
                       footer_links=["gradio", "settings"], css=CSS, allowed_paths=[str(ui.outputs)])
        except OSError as err:
            _error(f"cannot serve on {args.host}:{args.port} ({err}); pass another --port or --host")
            return 2
        print(f"supir-rt ui: serving on {app.local_url} (Ctrl+C to stop)", file=sys.stderr, flush=True)
        wait_for_stop()
        return 0
    finally:
        if app is not None:
            app.close()
        if restorer is not None:
            restorer.close()
        shutil.rmtree(workdir, ignore_errors=True)
        tempfile.tempdir = saved_tempdir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_stop() -> None:
    """Block until Ctrl+C or SIGTERM (the cleanup after it runs in the caller's ``finally``)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("supir-rt ui: stopping; removing the temporary files", file=sys.stderr)


__all__ = ["add_ui_parser", "check_address", "check_ui_args", "run_ui", "wait_for_stop"]
