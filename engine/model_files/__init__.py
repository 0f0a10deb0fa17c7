"""Flow models from the files users keep: original single files, Forge/ComfyUI split files, GGUF and fp8.

- ``layout``: what a family declares (``FileLayout``: prefixes, markers, text encoder slots, config variants, an
  optional converter of its own);
- ``folders``: the Forge/ComfyUI folder names, and picks looked up by name;
- ``tensors``: reading names, shapes and weights of safetensors/GGUF files (truncation found from the header, fp8
  upcast);
- ``parts``: which files make one model (the checkpoint's own components, the picks, or the one fitting set);
- ``assemble``: building the family's pipeline from those parts and a diffusers config folder;
- ``bfl_keys``: Black Forest Labs' Flux.1 names to diffusers', at any width.
- ``flux2_keys``: Black Forest Labs' FLUX.2 VAE names to diffusers' (whose single-file loader lacks that class).

``engine.models.ModelRegistry`` calls these for a single file whose family has a ``file_layout``.
"""
