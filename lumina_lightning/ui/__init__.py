"""User interfaces over :mod:`lumina_lightning.serving` (the Gradio demo in :mod:`.gradio_app`).

Nothing is imported here, so that importing the package does not pull in gradio.
"""
