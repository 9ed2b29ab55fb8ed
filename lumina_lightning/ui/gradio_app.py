"""The Gradio page of ``lumina demo``: components and events only.

Every decision (validation, presets, seeds, sizes, sampling, PNG metadata, the forward counts) is
made by :class:`lumina_lightning.serving.DemoService`; this file lays out widgets, hands their raw
values to it and turns its :class:`~lumina_lightning.serving.RequestError` into ``gr.Error`` so the
message reaches the page and API clients while the server keeps serving.

Set ``GRADIO_ANALYTICS_ENABLED=False`` before importing this module (``lumina_lightning.app`` does):
gradio reads it at import time.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from lumina_lightning.serving import APP_PRESETS, LIMITS, PRESET_CONTROLS, REQUEST_FIELDS, DemoService, RequestError

def _html(text: str) -> str:
    """Toasts and error modals render HTML; messages quote user text, which must show as text."""
    return html.escape(text, quote=False)


# Gradio's own cache of served files: drop files older than an hour, checked hourly.
CACHE_POLICY = (3600, 3600)


def build_demo(service: DemoService, *, concurrency: int | None = None, queue_size: int | None = 64) -> gr.Blocks:
    """The Blocks app on ``service``, with its queue set up.

    Args:
        concurrency: generations run at once (default: the service's ``config.concurrency``); further
            requests wait in the queue (one model, one worker is right on a CPU or a small GPU). The
            service enforces it too, so a cancelled request still running cannot exceed it.
        queue_size: requests that may wait; more are turned away with gradio's "queue is full".
    """
    if concurrency is None:
        concurrency = service.config.concurrency
    elif concurrency != service.config.concurrency:
        service.set_concurrency(concurrency)
    d = service.defaults()
    cfg = service.config
    m = service.size_multiple
    sizes = service.resolution_presets()

    with gr.Blocks(title="Lumina-Image 2.0 demo", analytics_enabled=False, delete_cache=CACHE_POLICY) as demo:
        gr.Markdown("## Lumina-Image 2.0 text-to-image demo")
        gr.Markdown(service.describe(), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red circle left of a blue square",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="(optional)",
                                      elem_id="negative-prompt")
                system = gr.Dropdown(service.system_choices, value=d["system"], label="System prompt template")
                with gr.Row():
                    size_preset = gr.Dropdown([s[0] for s in sizes], value=sizes[0][0] if sizes else None,
                                              label="Resolution preset (aspect ratio)")
                    width = gr.Number(d["width"], label=f"Width (multiple of {m})", precision=0, elem_id="width")
                    height = gr.Number(d["height"], label=f"Height (multiple of {m})", precision=0, elem_id="height")
                with gr.Row():
                    num_images = gr.Slider(1, cfg.max_images, value=d["num_images"], step=1, label="Images",
                                           elem_id="num-images")
                    randomize = gr.Checkbox(d["randomize_seed"], label="Random seed")
                    seed = gr.Number(d["seed"], label="Seed (shown after generation)", precision=0, elem_id="seed")
                preset = gr.Radio(list(APP_PRESETS), value=d["preset"], label="Preset (fills the sampler controls)")
                with gr.Accordion("Sampler", open=True):
                    solver = gr.Dropdown(service.solver_choices, value=d["solver"], label="Solver")
                    steps = gr.Slider(1, cfg.max_steps, value=d["steps"], step=1, label="Steps", elem_id="steps")
                    cfg_scale = gr.Slider(*LIMITS["cfg_scale"], value=d["cfg_scale"], step=0.1,
                                          label="CFG scale (1 = no guidance)")
                    renorm = gr.Slider(*LIMITS["renorm"], value=d["renorm"], step=0.05, label="CFG-Renorm (0 = off)")
                    cfg_trunc = gr.Slider(*LIMITS["cfg_trunc"], value=d["cfg_trunc"], step=0.01,
                                          label="CFG-Truncation: guide while model time t < value (1 = never truncate)")
                    teacache = gr.Slider(*LIMITS["teacache"], value=d["teacache"], step=0.01,
                                         label="TeaCache threshold (0 = off)")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=2, format="png", type="filepath", elem_id="gallery")
                summary = gr.Markdown(label="Summary", elem_id="summary")
                files = gr.File(label="PNG downloads (prompt, seed and settings in the metadata)",
                                file_count="multiple", elem_id="downloads")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Details")

        inputs = {
            "prompt": prompt, "negative_prompt": negative, "system": system, "width": width, "height": height,
            "num_images": num_images, "randomize_seed": randomize, "seed": seed, "preset": preset, "solver": solver,
            "steps": steps, "cfg_scale": cfg_scale, "renorm": renorm, "cfg_trunc": cfg_trunc, "teacache": teacache,
        }
        controls = {"solver": solver, "steps": steps, "cfg_scale": cfg_scale, "renorm": renorm,
                    "cfg_trunc": cfg_trunc, "teacache": teacache}

        # gradio_client fills a parameter a client leaves out with its component's initial value,
        # which for the sampler controls is the official preset's: predict(preset="fast") would run
        # official's sampler. So /generate reads those six from hidden, empty twins: a control left
        # out arrives as None and the service takes the requested preset's value. The page's own
        # event sends the visible controls (the preset radio fills them in, below).
        blank = {k: gr.Number(None, visible=False) for k in PRESET_CONTROLS}
        blank["solver"] = gr.Dropdown(service.solver_choices, value=None, visible=False)

        # Named parameters (in REQUEST_FIELDS order) become the API's keyword names: clients can call
        # predict(prompt="...", seed=7, randomize_seed=False, api_name="/generate").
        # (A None default makes a parameter optional for clients: gradio does not count an empty
        # Textbox, or Number, as a default.)
        # async: gradio cancels the task of a cancelled request, which agenerate turns into the
        # request's cancel flag (a plain function would keep sampling in its thread, unseen)
        async def generate(prompt, negative_prompt=None, system=d["system"], width=d["width"], height=d["height"],
                     num_images=d["num_images"], randomize_seed=d["randomize_seed"], seed=d["seed"],
                     preset=d["preset"], solver=None, steps=None, cfg_scale=None, renorm=None, cfg_trunc=None,
                     teacache=None, progress=gr.Progress()) -> tuple:
            raw = dict(zip(REQUEST_FIELDS, (prompt, negative_prompt, system, width, height, num_images,
                                            randomize_seed, seed, preset, solver, steps, cfg_scale, renorm,
                                            cfg_trunc, teacache)))

            def report(done: int, total: int, desc: str) -> None:
                progress((done, total), desc=desc)

            try:
                gen = await service.agenerate(raw, progress=report)
            except RequestError as err:
                raise gr.Error(_html(str(err)), print_exception=False) from None
            for notice in gen.notices:
                gr.Warning(_html(notice))
            return gen.gallery, [str(f) for f in gen.files], gen.summary, gen.info(), gen.seeds[0]

        def fill_preset(name: str) -> tuple:
            try:
                values = service.preset_values(name)
            except RequestError as err:
                raise gr.Error(_html(str(err)), print_exception=False) from None
            return tuple(values[k] for k in PRESET_CONTROLS)

        def fill_size(label: str) -> tuple:
            try:
                return service.size_for(label)
            except RequestError as err:
                raise gr.Error(_html(str(err)), print_exception=False) from None

        # Raw payloads (preprocess=False): an API client's "abc" or 1e9 reaches the service's checks and
        # comes back as a sentence, instead of failing inside a component's conversion. Page and API
        # share one concurrency group: --concurrency bounds the generations of both together.
        event = dict(outputs=[gallery, files, summary, details, seed], preprocess=False,
                     concurrency_limit="default", concurrency_id="generate", show_progress="full")
        gr.on([], generate, inputs=[blank.get(k, inputs[k]) for k in REQUEST_FIELDS], api_name="generate", **event)
        gr.on([run.click, prompt.submit], generate, inputs=[inputs[k] for k in REQUEST_FIELDS],
              api_visibility="private", **event)
        preset.change(fill_preset, inputs=preset, outputs=[controls[k] for k in PRESET_CONTROLS],
                      api_visibility="undocumented", queue=False)
        size_preset.input(fill_size, inputs=size_preset, outputs=[width, height], api_visibility="undocumented",
                          queue=False)

    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    return demo


def launch(
    demo: gr.Blocks,
    service: DemoService,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> Any:
    """Start the server (loopback unless told otherwise; no share link unless asked)."""
    return demo.launch(
        server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False,
        allowed_paths=[str(service.output_dir)], prevent_thread_lock=not block, inbrowser=False,
    )
