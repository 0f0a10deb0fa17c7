"""How a flow family keeps its components in files, as users download them (declared by each family).

Two layouts are read:

- **All-in-one**: one ``.safetensors`` with the transformer under ``transformer_prefix`` (the original training
  code's ``model.diffusion_model.``), each text encoder under its slot's ``prefix`` and the VAE under
  ``vae_prefix`` (``first_stage_model.``). A component the file lacks (SD 3.5 files are often published without
  T5) is looked for as a split file.
- **Split** (Forge, ComfyUI): the transformer alone, with or without the prefix, and each text encoder and the VAE
  as files of their own in the module folders (``engine.model_files.folders``).

A family fills in one ``FileLayout``; finding, matching and loading the files is shared
(``engine.model_files.parts`` and ``engine.model_files.assemble``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


# How the Hugging Face encoders every flow family uses are recognised in a file (after any wrapper prefix).
CLIP_MARKER = "text_model.embeddings.position_embedding.weight"
CLIP_WIDTH = "text_model.embeddings.token_embedding.weight"  # [vocabulary, width]
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_WIDTH = "encoder.final_layer_norm.weight"  # [width]
# Qwen3 (Z-Image, Flux.2 Klein): the per-head key norm tells it from Qwen2/Llama; files keep transformers' names with
# or without the ``model.`` level (``model.layers.N...`` as ComfyUI's qwen_3_4b.safetensors has them).
QWEN3_MARKER = "layers.0.self_attn.k_norm.weight"
QWEN3_WIDTH = "embed_tokens.weight"  # [vocabulary, width]
QWEN_TOKENIZER_FILES = ("vocab.json, merges.txt and tokenizer_config.json (it holds the chat template) from the "
                        "Qwen3 model's repository, or the tokenizer/ folder of the model's diffusers repository")


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder a family's pipeline takes, and how to recognise its weights in a file."""

    component: str  # the pipeline's attribute: "text_encoder_3"
    tokenizer: str  # its tokenizer's attribute: "tokenizer_3"
    prefix: str  # where an all-in-one file keeps it: "text_encoders.t5xxl.transformer."
    marker: str  # a weight name (after any wrapper prefix) every file of this kind holds
    width_key: str  # the weight whose last dimension is the encoder's width
    width_config: str  # the config key that width must equal: "hidden_size" (CLIP), "d_model" (T5)
    name_hints: tuple[str, ...]  # words in a file name that say it is this slot's ("clip_l"); tells same-width CLIPs apart
    title: str  # as the artist reads it: "CLIP-L", "T5-XXL"
    optional: bool = False  # the pipeline runs without it (SD 3.5 without T5: zeros stand in, as diffusers does)
    identity_projection: bool = False  # a file without text_projection gets the identity (ComfyUI's SD 3 CLIP-L pools unprojected)
    wrappers: tuple[str, ...] = ("transformer.", "model.")  # prefixes some split files keep around the Hugging Face names
    tokenizer_files: str = ""  # what the missing-tokenizer error asks for, when it is not a tokenizer.json/spiece.model


@dataclass(frozen=True)
class FileLayout:
    """Where a flow family's components live in the original single-file layout, and what tells its files apart."""

    transformer_prefix: str  # "model.diffusion_model."
    transformer_marker: str  # a transformer weight name (without the prefix) only this family has
    vae_prefix: str  # "first_stage_model."
    vae_marker: str  # a VAE weight name (original layout, without the prefix)
    text_encoders: tuple[TextEncoderSlot, ...]
    # The shipped config variant (a folder under engine/configs/<family>/variants, "" for the base) for a transformer's
    # weights: (names without the prefix, shape_of) -> variant, or None when no shipped config fits.
    config_variant: Callable[[set[str], Callable[[str], list[int]]], str | None] = lambda names, shape_of: ""
    # The family's own converter to diffusers' names, (weights without the prefix, transformer config) -> weights, where
    # diffusers' single-file converter does not fit every shape (Flux's fixes the width); None: diffusers' own.
    to_diffusers: Callable[[dict, dict], dict] | None = None
    # The same for the VAE, where diffusers has no single-file converter for the family's VAE class (Flux.2's).
    vae_to_diffusers: Callable[[dict, dict], dict] | None = None

    def holds_transformer(self, keys: set[str]) -> bool:
        return self.transformer_prefix + self.transformer_marker in keys or self.transformer_marker in keys

    def transformer_names(self, keys: set[str]) -> tuple[set[str], str]:
        """The transformer's weight names without the prefix, and the prefix the file uses ("" for a split file)."""
        if self.transformer_prefix + self.transformer_marker in keys:
            prefix = self.transformer_prefix
            return {key[len(prefix):] for key in keys if key.startswith(prefix)}, prefix
        return set(keys), ""


def qwen3_slot(component: str = "text_encoder", tokenizer: str = "tokenizer") -> TextEncoderSlot:
    """The Qwen3 text encoder of Z-Image and Flux.2 Klein, as a file of its own (ComfyUI's qwen_3_4b.safetensors,
    ``model.layers.N...``; the 4B one serves both) or in an all-in-one file under ``text_encoders.qwen3_4b.``."""
    return TextEncoderSlot(component, tokenizer, "text_encoders.qwen3_4b.", QWEN3_MARKER, QWEN3_WIDTH, "hidden_size",
                           name_hints=("qwen",), title="Qwen3", wrappers=("model.", "transformer.model."),
                           tokenizer_files=QWEN_TOKENIZER_FILES)
