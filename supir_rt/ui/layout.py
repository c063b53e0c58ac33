"""The page of `supir-rt ui`: Gradio components wired to the plain functions of `RestoreUI`.

Left column: the photo (drop, paste or click), its sizes, the buttons, the status line, the caption and
prompts, the preset and the knobs. Right column: the before/after slider, the stage-1 image, the PNG to
download, and "Reproduce" (drop a supir-rt PNG to read its settings back). The footer names the device,
backend and model.

Model jobs (restore, stage 1, LLaVA caption) share one queue slot (``concurrency_id="model"``), so
concurrent users wait their turn and see their place in the queue; the light callbacks (sizes, prompt
warnings, presets, reproduce) run beside it. Problems go to the status line, never a stack trace:
`UIError` messages as they are, anything else as "internal error" with the details in the server log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from supir_rt.ui.callbacks import Cancelled, RestoreUI, UIError
from supir_rt.ui.knobs import Knob

log = logging.getLogger(__name__)

MODEL_QUEUE = "model"
CSS = """
#status .prose { min-height: 1.5em; }
#status.error, #status .error { color: var(--error-text-color); }
#footer { opacity: 0.8; font-size: 0.9em; }
"""


def upload_path(value: Any) -> str | None:
    """The server path of an upload as an event with ``preprocess=False`` receives it (a FileData dict).

    Events that read the photo skip Gradio's preprocessing: it would decode the file with Pillow's
    defaults first, so a non-image or a decompression bomb would fail inside Gradio with a bare "Error"
    instead of reaching `RestoreUI.load` and its messages. Gradio still checks, before any event runs,
    that the path lies in its upload folder (a client cannot point at other server files).
    """
    if not value:
        return None
    if isinstance(value, dict):
        return value.get("path")
    return str(value)


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def status_text(message: str, error: bool = False) -> str:
    return f"<span class='error'>**Error:** {message}</span>" if error else message


def guarded(fn: Callable[..., Any], error_outputs: Callable[[str], Any]) -> Callable[..., Any]:
    """``fn`` with `UIError` (and, logged, any other exception) turned into ``error_outputs(message)``."""

    @functools.wraps(fn)  # Gradio reads the signature (gr.Request, gr.Progress parameters) through it
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UIError as err:
            return error_outputs(str(err))
        except Exception:  # an internal bug: the details go to the server log, not to the page
            log.exception("internal error in %s", getattr(fn, "__name__", "callback"))
            return error_outputs("internal error; the server log has the details")

    return wrapper


def knob_component(knob: Knob, value: Any) -> gr.components.Component:
    common = {"label": knob.label, "info": knob.help, "elem_id": f"knob-{knob.name}"}
    if knob.kind == "slider":
        return gr.Slider(minimum=knob.minimum, maximum=knob.maximum, step=knob.step, value=value,
                         precision=0 if knob.number_type is int else None, **common)
    if knob.kind in ("int", "float"):
        return gr.Number(value=value, minimum=knob.minimum, maximum=knob.maximum, step=knob.step or 1,
                         precision=0 if knob.number_type is int else None, **common)
    if knob.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if knob.kind == "choice":
        return gr.Dropdown(choices=list(knob.choices), value=value, **common)
    lines = 3 if knob.group == "prompt" else 1
    return gr.Textbox(value=value, lines=lines, **common)


def knob_update(knob: Knob, value: Any) -> Any:
    """A new value for a knob's control; a slider's range widens to hold a value from a PNG or a preset
    (Gradio refuses slider values outside the range)."""
    if knob.kind != "slider" or not isinstance(value, (int, float)):
        return gr.update(value=value)
    return gr.update(value=value, minimum=min(knob.minimum, value), maximum=max(knob.maximum, value))


def build_app(ui: RestoreUI, *, title: str = "supir-rt") -> gr.Blocks:
    """The Blocks app over ``ui`` (queue it and launch it; see `supir_rt.ui.cli.run_ui`)."""
    values = ui.initial_values()
    tiny = ui.restorer.description.get("model") == "tiny-random"
    with gr.Blocks(title=title, delete_cache=(600, 3600)) as app:
        gr.Markdown("## supir-rt: restore a photo with SUPIR" + (
            "  \n**Tiny random model**: this server shows the pipeline working; its output is NOT a restoration."
            if tiny else ""))
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                photo = gr.Image(label="Photo: drop, paste or click", sources=["upload", "clipboard"],
                                 type="filepath", image_mode=None, height=300, elem_id="photo")
                sizes = gr.Markdown(elem_id="sizes")
                with gr.Row():
                    stage1_btn = gr.Button("Stage 1", elem_id="stage1-btn")
                    run_btn = gr.Button("Restore", variant="primary", elem_id="run-btn")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    caption = gr.Textbox(label="Caption", lines=2, scale=3, elem_id="caption",
                                         info="what the photo shows; joined with the quality prompt "
                                              "(empty = no caption, as --no_llava)")
                    with gr.Column(scale=2, min_width=180):
                        caption_file = gr.File(label="Caption from a .txt (the photo's sidecar)", file_types=[".txt"],
                                               type="filepath", height=120, elem_id="caption-file")
                        llava_btn = gr.Button("Caption with LLaVA", size="sm", visible=ui.has_captioner,
                                              elem_id="llava-btn")
                prompt_notes = gr.Markdown(elem_id="prompt-notes")
                preset = gr.Dropdown(choices=ui.presets, value="official", label="Preset",
                                     info="starting values of every knob below except the seed and the prompts",
                                     elem_id="preset")
                knobs: dict[str, gr.components.Component] = {}
                main = [k for k in ui.knobs if k.group == "main" and k.name != "seed"]
                for pair in (main[i:i + 2] for i in range(0, len(main), 2)):
                    with gr.Row():
                        for knob in pair:
                            knobs[knob.name] = knob_component(knob, values[knob.name])
                seed_knob = next(k for k in ui.knobs if k.name == "seed")
                with gr.Row(equal_height=True):
                    knobs["seed"] = knob_component(seed_knob, values["seed"])
                    dice = gr.Button("New seed", size="sm", scale=0, min_width=100, elem_id="dice")
                groups = (("prompt", "Quality and negative prompts"), ("advanced", "More settings"),
                          ("tiling", "Tiling"))
                for group, label in groups:
                    members = [k for k in ui.knobs if k.group == group]
                    if members:
                        with gr.Accordion(label, open=False, elem_id=f"group-{group}"):
                            for knob in members:
                                knobs[knob.name] = knob_component(knob, values[knob.name])
            with gr.Column(scale=6):
                compare = gr.ImageSlider(label="Before / after", type="pil", elem_id="compare", height=420)
                download = gr.File(label="Restored PNG (its metadata holds the settings)", elem_id="download",
                                   interactive=False)
                stage1_img = gr.Image(label="Stage 1: what the colour fix and the captioner see", type="pil",
                                      interactive=False, height=260, elem_id="stage1")
                reproduce = gr.File(label="Reproduce: drop a PNG written by supir-rt to load its settings",
                                    file_types=[".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"],
                                    type="filepath", elem_id="reproduce")
        gr.Markdown(ui.footer(), elem_id="footer")

        knob_names = list(knobs)
        by_name = {k.name: k for k in ui.knobs}
        knob_list = [knobs[n] for n in knob_names]

        def knob_values(data: dict[Any, Any]) -> dict[str, Any]:
            return {name: data[knobs[name]] for name in knob_names}

        light = {"concurrency_limit": None, "api_visibility": "private"}
        model_job = {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE, "api_visibility": "private",
                     "preprocess": False}  # every model job reads the photo: see upload_path

        # -- the photo and its sizes
        def on_photo(data: dict[Any, Any]) -> tuple[Any, Any, Any]:
            path = upload_path(data[photo])
            if not path:
                return "", gr.update(), gr.update()
            try:
                return ui.describe(path, knob_values(data)), "", gr.update()
            except UIError as err:  # a bad upload: say why and clear the photo box
                return "", status_text(str(err), error=True), None

        photo.change(guarded(on_photo, lambda m: ("", status_text(m, True), None)), inputs={photo, *knob_list},
                     outputs=[sizes, status, photo], show_progress="hidden", preprocess=False, **light)
        for name in ("upscale", "min_size"):
            if name in knobs:
                describe = guarded(lambda d: ui.describe(upload_path(d[photo]), knob_values(d)),
                                   lambda m: status_text(m, True))
                knobs[name].change(describe, inputs={photo, *knob_list}, outputs=sizes, show_progress="hidden",
                                   trigger_mode="always_last", preprocess=False, **light)

        # -- caption and prompt warnings
        caption_file.upload(guarded(lambda path: (ui.read_caption_file(path), ""),
                                    lambda m: (gr.update(), status_text(m, True))),
                            inputs=caption_file, outputs=[caption, status], **light)
        prompt_inputs = [caption] + [knobs[n] for n in ("a_prompt", "n_prompt", "quality_first") if n in knobs]
        warn = guarded(ui.prompt_warnings, lambda m: status_text(m, True))
        for component in prompt_inputs:
            component.change(warn, inputs=prompt_inputs, outputs=prompt_notes, show_progress="hidden",
                             trigger_mode="always_last", **light)
        llava_btn.click(guarded(lambda d: (ui.caption(upload_path(d[photo]), knob_values(d)), ""),
                                lambda m: (gr.update(), status_text(m, True))),
                        inputs={photo, *knob_list}, outputs=[caption, status], **model_job)

        # -- presets, dice, reproduce
        def on_preset(name: str) -> list[Any]:
            chosen = ui.preset_values(name)
            return [knob_update(by_name[n], chosen[n]) if n in chosen else gr.update() for n in knob_names]

        preset.change(guarded(on_preset, lambda m: [gr.update()] * len(knob_names)), inputs=preset,
                      outputs=knob_list, **light)
        dice.click(ui.random_seed, outputs=knobs["seed"], **light)

        def on_reproduce(path: str | None) -> list[Any]:
            if not path:
                return [gr.update()] * (len(knob_names) + 1) + [""]
            got = ui.reproduce(path)
            return ([knob_update(by_name[n], got.values[n]) if n in got.values else gr.update() for n in knob_names]
                    + [got.caption, got.status])

        def reproduce_failed(message: str) -> list[Any]:
            return [gr.update()] * (len(knob_names) + 1) + [status_text(message, True)]

        reproduce.upload(guarded(on_reproduce, reproduce_failed), inputs=reproduce,
                         outputs=[*knob_list, caption, status], **light)

        # -- model jobs
        def on_stage1(data: dict[Any, Any]) -> tuple[Any, str]:
            return ui.stage1(upload_path(data[photo]), knob_values(data)), "Stage 1 done."

        stage1_btn.click(guarded(on_stage1, lambda m: (gr.update(), status_text(m, True))),
                         inputs={photo, *knob_list}, outputs=[stage1_img, status], **model_job)

        ticket = gr.State(0)  # the session's cancel counter, sent with each job when it is submitted

        def on_run(data: dict[Any, Any], request: gr.Request, progress: gr.Progress = gr.Progress()
                   ) -> tuple[Any, Any, Any, str]:
            try:
                out = ui.restore(upload_path(data[photo]), data[caption], knob_values(data),
                                 session=session_of(request), ticket=data[ticket],
                                 report=lambda fraction, text: progress(fraction, desc=text))
            except Cancelled:
                return gr.update(), gr.update(), gr.update(), "Cancelled."
            return (out.before, out.after), str(out.png), out.stage1, out.status

        run_btn.click(guarded(on_run, lambda m: (gr.update(), gr.update(), gr.update(), status_text(m, True))),
                      inputs={photo, caption, ticket, *knob_list}, outputs=[compare, download, stage1_img, status],
                      **model_job)

        def on_cancel(current: int, request: gr.Request) -> tuple[str, int]:
            return ui.cancel(session_of(request), current), current + 1

        cancel_btn.click(on_cancel, inputs=ticket, outputs=[status, ticket], queue=False, api_visibility="private")
        app.load(warn, inputs=prompt_inputs, outputs=prompt_notes, **light)
    return app


__all__ = ["CSS", "build_app", "guarded", "knob_component", "knob_update", "session_of", "status_text", "upload_path"]
