"""The shape every model family file fills in: one ``Family`` object per family.

A family says how its models are told apart, loaded, sampled and conditioned, so the
rest of the engine asks the family instead of testing the model's name (like
ComfyUI's per-model latent formats, grown to cover the whole model). Facts that hold
for every Stable Diffusion UNet family live here as defaults; each family file
overrides what differs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch

from ..checkpoint_convert import LayoutComponent
from ..fields import FIELDS, UNET
from ..prompts import Conditioning, PromptEncoder, TextLayer

if TYPE_CHECKING:
    from ..model_files.layout import FileLayout
    from ..sampling.noise_table import NoiseTable

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
FAMILY_FILE = "sfumato.json"  # a model folder's own overrides of its family's constants (the demo model ships one)
MODES = ("txt2img", "img2img", "inpaint")
# diffusers' prediction_type -> the parameterization the denoiser undoes.
PARAMETERIZATIONS = {"epsilon": "eps", "v_prediction": "v"}
# Loading an SD 1.x/2.x pipeline without the safety checker it may name.
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclass(frozen=True)
class LatentFormat:
    """The latent space a family's VAE encodes to (ComfyUI's ``LatentFormat``).

    ``scaling_factor`` and ``shift`` are the published constants; a loaded model's own VAE config
    wins where it has one. The preview factors map one latent pixel, as the model sees it, to RGB
    in [-1, 1].
    """

    channels: int
    scaling_factor: float
    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shift: float = 0.0
    tiny_decoder: str = "taesd"  # the TAESD variant that decodes this latent (madebyollin/taesd*)

    def to_rgb_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.rgb_factors, dtype=torch.float32), torch.tensor(self.rgb_bias, dtype=torch.float32)


@dataclass(frozen=True)
class SingleFileLayout:
    """Where a family's components live in an original-layout (CompVis/SGM) single file."""

    marker: str  # a key prefix only this family's full checkpoints have (its text encoder)
    prefixes: dict[str, str]  # component -> key prefix, for the components whose weights are compared with the config
    components: tuple[LayoutComponent, ...]  # how each diffusers component is written out (engine.checkpoint_convert)


@dataclass(frozen=True)
class ModelInputs:
    """A family's extra inputs to the per-step model call, for one image of the positive and of the negative prompt."""

    positive: dict[str, torch.Tensor] = field(default_factory=dict)
    negative: dict[str, torch.Tensor] = field(default_factory=dict)

    def batched(self, batch: int, do_cfg: bool, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """Laid out as the text embeddings are: ``[negative × batch, positive × batch]`` with CFG, else
        ``positive × batch``; None when the family has none."""
        if not self.positive:
            return None
        batched = {}
        for key, positive in self.positive.items():
            rows = positive.repeat(batch, 1)
            if do_cfg:
                rows = torch.cat([self.negative[key].repeat(batch, 1), rows])
            batched[key] = rows.to(device, dtype)
        return batched


# A model card's recommended settings (``sfumato.json``) → the request fields they set when the model is chosen.
RECOMMENDED_SETTINGS = MappingProxyType({"recommended_sampler": "sampler", "recommended_schedule": "schedule",
                                         "recommended_steps": "steps", "recommended_cfg": "cfg_scale"})


@dataclass(frozen=True)
class Family:
    """One model family: detection, loading, latent format, parameterization, prompt encoding, model call, sizes.

    Instances are constants (``SD1``, ``SD2``, ``SDXL``); a model folder's ``sfumato.json`` makes a
    copy with its own name, native size and preview factors (``with_overrides``). What every model
    of the family shares, whatever the overrides, is a class attribute.

    ``defaults``: request field name → the value the family draws best with (Flux.1 dev: CFG 1, distilled CFG 3.5,
    Euler, Simple, 20 steps), for the UI to apply when the model is chosen; the engine never overrides a request.
    """

    name: str
    native_size: tuple[int, int]
    latent: LatentFormat
    min_size: int = 64
    max_size: int = 2048
    modes: tuple[str, ...] = MODES
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    id: ClassVar[str]  # the family's folder name: engine/configs/<id>, extension config folders
    title: ClassVar[str]  # as the artist reads it: "SD 1.x"
    # What sets it apart as far as the request goes (engine.fields' UNET, FLOW, DISTILLED_GUIDANCE): the fields that
    # name a trait in ``only_for`` are shown, written and passed to the model only for families that have it.
    traits: ClassVar[frozenset[str]] = frozenset({UNET})
    # Loading
    denoiser: ClassVar[str] = "unet"  # the pipeline attribute holding the denoising model, whose config detection reads
    pipeline_classes: ClassVar[tuple[str, ...]]  # the diffusers pipelines whose folders hold this family (first: the one loaded)
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # a folder must have them
    load_options: ClassVar[dict[str, Any]] = {}  # extra keywords for the pipeline's from_single_file
    missing_component_hints: ClassVar[dict[str, str]] = {}  # component -> what its absence usually means
    single_file: ClassVar[SingleFileLayout]
    # Flow families: where the original single file and the split files (Forge, ComfyUI) keep each component
    # (engine.model_files); None for the UNet families, whose single files load through ``single_file``.
    file_layout: ClassVar["FileLayout | None"] = None
    # Prompt encoding
    text_encoders: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"),)
    pooled_encoder: ClassVar[int | None] = None
    embedding_keys: ClassVar[tuple[str, ...]] = ("",)  # each text encoder's key in a textual-inversion file ("": one tensor)
    # Parameterization
    default_prediction_type: ClassVar[str] = "epsilon"
    # NVIDIA's published Align Your Steps σs for this family: the constant's name in engine.sampling.noise_table,
    # read when the table is built, so the sampling package loads only when sampling needs it. A1111 uses the
    # SD 1.5 list for every model that is not SDXL.
    align_your_steps: ClassVar[str] = "AYS_SD15"
    # Networks: the original-layout naming a kohya LoRA of this family's denoiser uses, when it is not the diffusers
    # module's own (engine.networks.transformer_layouts converts it); None: kohya names resolve against the modules.
    lora_layout: ClassVar[str | None] = None
    # Performance: whether the denoiser's call may be replayed from a TorchScript trace (engine.traced_calls), i.e. runs
    # the same ops for every input of one shape; a model whose ops depend on its inputs' values must say no.
    traceable_call: ClassVar[bool] = True

    # -- detection --------------------------------------------------------------------------
    def matches_config(self, unet_config: dict) -> bool:
        """Whether a diffusers config of the family's denoiser (a UNet config here) is this family's."""
        raise NotImplementedError

    def matches_checkpoint(self, keys: set[str]) -> bool:
        """Whether an original-layout single file's key names hold this family's full checkpoint (a flow family:
        its transformer, alone or with the other components)."""
        if self.file_layout is not None:
            return self.file_layout.holds_transformer(keys)
        return any(key.startswith(self.single_file.marker) for key in keys)

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        """Whether original-layout UNet-shaped weights under ``prefix`` (a checkpoint's UNet, a control model's
        copy of its encoder half) were made for this family."""
        raise NotImplementedError

    # -- loading ----------------------------------------------------------------------------
    @property
    def config_folder(self) -> Path:
        """The diffusers config folder shipped for this family's single files (engine/configs/<id>)."""
        return CONFIGS_DIR / self.id

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def load_single_file(self, path: Path, config: Path, dtype: torch.dtype):
        """The pipeline from an original-layout single file, configured by the diffusers folder ``config``."""
        return self.pipeline_class().from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype,
                                                      **self.load_options)

    def prompt_encoder(self, components) -> PromptEncoder:
        return PromptEncoder(components, self)

    def with_overrides(self, path: Path) -> "Family":
        """This family as a model's own ``sfumato.json`` describes it: name, native size, preview factors, and the
        settings its card recommends (``recommended_sampler``, ``_schedule``, ``_steps``, ``_cfg``), which become its
        ``defaults``, the values the UI sets when the model is chosen."""
        data = json.loads(path.read_text())
        recommended = {name: FIELDS[name].type(data[key]) for key, name in RECOMMENDED_SETTINGS.items() if key in data}
        width = int(data.get("native_width", self.native_size[0]))
        height = int(data.get("native_height", self.native_size[1]))
        latent = replace(
            self.latent,
            rgb_factors=tuple(tuple(float(v) for v in row) for row in data.get("latent_rgb_factors", self.latent.rgb_factors)),
            rgb_bias=tuple(float(v) for v in data.get("latent_rgb_bias", self.latent.rgb_bias)),
        )
        return replace(self, name=str(data.get("family", self.name)), native_size=(width, height), latent=latent,
                       min_size=min(self.min_size, width, height),
                       defaults=MappingProxyType({**self.defaults, **recommended}) if recommended else self.defaults)

    # -- latent format (kept under the names the previewer has always read) -------------------
    @property
    def latent_rgb_factors(self) -> tuple[tuple[float, float, float], ...]:
        return self.latent.rgb_factors

    @property
    def latent_rgb_bias(self) -> tuple[float, float, float]:
        return self.latent.rgb_bias

    def latent_to_rgb_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent.to_rgb_matrix()

    # -- the model's latent and the VAE's ------------------------------------------------------
    # Model-latent pixels fold latent_patch × latent_patch VAE-latent pixels into channels (Flux.2: 2; others: 1).
    latent_patch: ClassVar[int] = 1

    def model_latent(self, vae_latent: torch.Tensor, vae, scaling: float, shift: float) -> torch.Tensor:
        """The latent the model samples, from the VAE's: (z − shift) · scaling (SD's scale; SD3's and Flux's shift)."""
        return (vae_latent - shift) * scaling

    def vae_latent(self, latent: torch.Tensor, vae, scaling: float, shift: float) -> torch.Tensor:
        """The VAE's latent, from the model's (the inverse of ``model_latent``)."""
        return latent / scaling + shift

    # -- parameterization and noise ----------------------------------------------------------
    def parameterization(self, scheduler_config: dict) -> str:
        """What the model predicts, "eps" or "v", from its scheduler config's ``prediction_type``."""
        prediction = scheduler_config.get("prediction_type") or self.default_prediction_type
        if prediction not in PARAMETERIZATIONS:
            raise ValueError(f"prediction_type {prediction!r} is not one Sfumato samples ({', '.join(PARAMETERIZATIONS)})")
        return PARAMETERIZATIONS[prediction]

    def noise_table(self, scheduler_config: dict, zero_terminal_snr: bool | None = None,
                    shift: float | None = None) -> "NoiseTable":
        """The training noise table (σ per timestep) from the model's scheduler config: the β schedule of
        Ho et al. 2020 as latent diffusion trains it. ``zero_terminal_snr`` None follows the config's
        ``rescale_betas_zero_snr``. ``shift`` (a flow model's timestep shift) does not apply to a β schedule."""
        from ..sampling import noise_table

        if zero_terminal_snr is None:
            zero_terminal_snr = bool(scheduler_config.get("rescale_betas_zero_snr", False))
        return noise_table.NoiseTable.for_betas(
            float(scheduler_config.get("beta_start", 0.00085)), float(scheduler_config.get("beta_end", 0.012)),
            str(scheduler_config.get("beta_schedule", "scaled_linear")), int(scheduler_config.get("num_train_timesteps", 1000)),
            zero_terminal_snr=zero_terminal_snr, align_your_steps=getattr(noise_table, self.align_your_steps),
        )

    def noise_table_for_latent(self, scheduler_config: dict, latent_size: tuple[int, int],
                               zero_terminal_snr: bool | None = None, shift: float | None = None,
                               steps: int | None = None) -> "NoiseTable":
        """The noise table for sampling a latent of ``latent_size`` (width, height in model-latent pixels) in ``steps``
        steps: the family's one table, except where the σ shift depends on them (Flux.1's resolution-dependent shift,
        Flux.2's resolution- and step-dependent μ)."""
        return self.noise_table(scheduler_config, zero_terminal_snr, **({"shift": shift} if shift else {}))

    def max_size_of(self, denoiser_config, vae_scale_factor: int) -> int:
        """The largest side a model of this family draws (``LoadedModel.max_size``); SD3 lowers it to its position table."""
        return self.max_size

    def latent_channels(self, denoiser_config: dict) -> int:
        """The channels of the latent the sampler works on, from the denoising model's config: what it outputs (a transformer whose config leaves
        ``out_channels`` out or None, as Z-Image's and Flux.2's do, outputs what it takes in)."""
        return int(denoiser_config.get("out_channels") or denoiser_config["in_channels"])

    def request_inputs(self) -> tuple[str, ...]:
        """Request fields this family's model takes as inputs of its per-step call (Flux.1 dev: ``distilled_cfg_scale``):
        the fields declared ``model_input`` that this family uses (``Field.only_for``). The engine hands their values
        to the model call in ``added_cond_kwargs`` under the field's name. The UNet families take none."""
        return tuple(field.name for field in FIELDS if field.model_input and field.used_by(self.traits))

    # -- prompt encoding -------------------------------------------------------------------------
    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        """Which layer of each text encoder conditions the model for A1111's "Clip skip" (1 = the default)."""
        raise NotImplementedError

    # -- networks (LoRA) ----------------------------------------------------------------------------
    def network_components(self) -> dict[str, str]:
        """kohya's LoRA key prefix → the pipeline component it patches: the denoiser and each text encoder
        (SDXL-style ``lora_te1_`` / ``lora_te2_`` for a second encoder)."""
        encoders = [encoder for _, encoder in self.text_encoders]
        prefixes = {"lora_unet_": self.denoiser, "lora_te_": encoders[0]}
        for index, encoder in enumerate(encoders, start=1):
            prefixes[f"lora_te{index}_"] = encoder
        if self.denoiser == "transformer":
            prefixes["lora_transformer_"] = self.denoiser  # OneTrainer: the diffusers transformer's own module names
        return prefixes

    # -- the per-step model call ----------------------------------------------------------------
    def model_call(self, pipeline) -> Callable:
        """The denoising model as the denoiser calls it, UNet-style: ``(x, timestep, encoder_hidden_states=,
        added_cond_kwargs=, return_dict=False, **hook_kwargs) -> (output,)``. A UNet family's is its UNet."""
        return getattr(pipeline, self.denoiser)

    def unet_kwargs(self, conditioning: Conditioning, width: int, height: int) -> ModelInputs:
        """Extra inputs of the UNet call beyond latents, timestep and text embeddings (none by default)."""
        return ModelInputs()
