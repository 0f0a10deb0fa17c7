"""Wires the engine's parts together for a running app: registry, extensions,
engine, job queue, outputs, presets and settings. The UI, the HTTP API and the
command line all start from one ``Studio``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import atomic_write, file_hashes
from .engine import Engine
from .errors import ModelError
from .jobs import JobQueue, JobRunner
from .models import REPO_ROOT, ModelRegistry
from .performance import PerformanceOptions
from .request import GenerationResult
from .settings import Settings, SettingsStore

log = logging.getLogger("sfumato")
UNTRAINED_MODEL_NAME = "untrained-placeholder"


@dataclass
class StudioConfig:
    models_dir: Path = REPO_ROOT / "models"
    outputs_dir: Path = REPO_ROOT / "outputs"
    user_dir: Path = REPO_ROOT / "user_data"
    extensions_dir: Path = REPO_ROOT / "extensions"
    presets_dir: Path = REPO_ROOT / "presets"
    builtin_models_dir: Path | None = REPO_ROOT / "builtin"
    device: str | None = None  # None: from settings
    dtype: str | None = None
    performance: PerformanceOptions = field(default_factory=PerformanceOptions)


HASH_CACHE_FILE = "hashes.json"  # model files' SHA-256s, kept across runs (A1111's cache.json "hashes")


def build_registry(config: StudioConfig, settings: Settings) -> ModelRegistry:
    """The model registry a config describes: the studio's own, and each engine replica's in serve mode."""
    file_hashes.remember_hashes_in(config.user_dir / HASH_CACHE_FILE)
    return ModelRegistry(config.models_dir, config.builtin_models_dir, device=config.device or settings.device,
                         dtype=config.dtype or settings.dtype, performance=performance_for(config, settings))


def performance_for(config: StudioConfig, settings: Settings) -> PerformanceOptions:
    """The launch options, with the memory check on only when neither ``--skip-memory-check`` nor the setting turns it off."""
    return replace(config.performance, memory_check=config.performance.memory_check and settings.memory_check)


def build_extensions(config: StudioConfig):
    """The extensions a config's folders hold (an ``ExtensionManager``), as the studio and each replica load them."""
    from .extensions import ExtensionManager

    return ExtensionManager(config.extensions_dir, config.user_dir / "extensions.json", models_dir=config.models_dir,
                            builtin_dir=config.builtin_models_dir)


class Studio:
    def __init__(self, config: StudioConfig | None = None):
        from .outputs import OutputWriter
        from .presets import PresetStore

        self.config = config or StudioConfig()
        self._remove_stale_temps()
        self.settings_store = SettingsStore(self.config.user_dir / "settings.json")
        self.settings: Settings = self.settings_store.load()
        self.registry = build_registry(self.config, self.settings)
        self._ensure_some_model()
        self.extensions = build_extensions(self.config)
        self.engine = Engine(self.registry, self.extensions)
        self.writer = OutputWriter(self.config.outputs_dir, self.settings.output_pattern)
        self.presets = PresetStore(self.config.presets_dir, self.config.user_dir / "presets")
        self.jobs = JobQueue(self.engine, save_result=self.save_result)

    def run_jobs_on(self, runner: JobRunner) -> None:
        """Run the queue's jobs on ``runner`` (serve mode: engine replicas) instead of this process's engine.
        Call before the UI and API start; they keep using ``self.jobs``, whatever runs its jobs."""
        self.jobs = JobQueue(self.engine, save_result=self.save_result, runner=runner)

    def _remove_stale_temps(self) -> None:
        """Temporary files a killed writer left among the outputs and the user's files (settings, presets,
        extension state); a recent one may belong to another running Sfumato and stays."""
        for folder in (self.config.outputs_dir, self.config.user_dir):
            removed = atomic_write.remove_stale_temps(folder, recursive=True)
            if removed:
                log.info("removed %d unfinished temporary file(s) left in %s by an interrupted save", len(removed), folder)

    def _ensure_some_model(self) -> None:
        """With no model anywhere (the demo model not trained yet), build a tiny random one so the
        studio still starts; it is marked UNTRAINED and the UI labels it so."""
        if any(entry.usable for entry in self.registry.list()):
            return
        from .tiny_models import build_sd1

        folder = self.config.models_dir / UNTRAINED_MODEL_NAME
        if not (folder / "model_index.json").is_file():
            log.warning("no models found: building an untrained placeholder model in %s", folder)
            build_sd1(folder)
            (folder / "UNTRAINED").write_text("random weights: train the demo model with `python launch.py train-demo`\n")
        self.registry.refresh()

    def default_model(self) -> str:
        """The model used when a request names none: the one chosen in Settings while it is installed and not
        broken (any spelling of its name), else the registry's first usable model."""
        if self.settings.default_model:
            try:
                chosen = self.registry.get(self.settings.default_model)
            except ModelError:
                chosen = None
            if chosen is not None and chosen.usable:
                return chosen.name
        return self.registry.default_name()

    def update_settings(self, settings: Settings) -> None:
        from .outputs import OutputWriter

        writer = OutputWriter(self.config.outputs_dir, settings.output_pattern)  # raises before anything is saved
        self.settings_store.save(settings)
        self.settings, self.writer = settings, writer
        self.registry.performance = performance_for(self.config, settings)  # the memory check applies from the next load

    def extras(self, sources: list, request, save: bool = True) -> list:
        """The Extras tab's upscale (``engine.extras``) of each source, run on the compute thread; saved to the
        outputs folder when ``save`` (A1111 saves what its tab makes; its API does not)."""
        from .compute import run_on_compute_thread
        from .extras import run_extras, save_extras

        results = run_on_compute_thread(run_extras, sources, request, self.registry.upscalers)
        if save:
            for result in results:
                save_extras(self.writer, result)
        return results

    def save_result(self, result: GenerationResult) -> None:
        """Write the images of a result that should be kept; the first failure is raised after trying them all.

        An image whose sampling stopped early (interrupt or skip) is saved only when the
        "save interrupted images" setting is on; otherwise it is returned with no path.
        """
        error = None
        for generated in result.images:
            if generated.stopped_early is not None and not self.settings.save_interrupted_images:
                continue
            try:
                mode = f"{result.request.mode}-grids" if generated.grid else result.request.mode  # A1111's grids folder
                generated.path = str(self.writer.save(generated.image, generated.infotext, mode, generated.seed,
                                                      model=result.request.model))
            except Exception as exc:  # noqa: BLE001 - reported to the caller, image still returned
                error = error or exc
        if error is not None:
            from .errors import SfumatoError

            raise error if isinstance(error, SfumatoError) else SfumatoError(f"could not save the image: {error}")
