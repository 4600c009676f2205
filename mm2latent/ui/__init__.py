"""The Hugging Face Space's UI pieces (settings, editor conversions, outputs, event handlers).

Everything here is testable without a browser; ``app.py`` only builds the Gradio Blocks and wires
events to :class:`mm2latent.ui.handlers.SpaceHandlers`. Importing this package is cheap: torch and
gradio are imported by the submodules that need them.
"""
