"""How pictures travel between the server and the browser: losslessly, except the throwaway live preview.

Gradio's image components (``gr.Image``, ``gr.ImageEditor``, ``gr.Gallery``) encode
every picture they send to the browser as WebP unless told otherwise, and that WebP
is lossy. A picture that goes out that way and comes back (a result sent to img2img
or inpaint, a control image restored from PNG Info, the mask preview we compare
against) comes back with most of its pixels changed, which would break the promise
that pixels outside an inpaint mask stay exactly as they were. So every component
that carries pixels declares ``format=LOSSLESS``; ``tests/test_image_formats.py``
walks the built app to keep it that way.
"""
from __future__ import annotations

LOSSLESS = "png"

# The step-by-step preview is redrawn many times a second and never read back: cheap beats exact there.
PREVIEW = "jpeg"
