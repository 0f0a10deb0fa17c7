"""Extensions: folders under ``extensions/`` that declare what they add, found at start-up.

An extension is a Python package ``extensions/<name>/`` whose ``__init__.py``
defines a module-level ``EXTENSION`` (an :class:`Extension`). The core never
imports an extension by name: :class:`ExtensionManager` imports each package by
file path, under a private namespace, and talks to it only through that
declaration (like a ComfyUI node: inputs, outputs and the function that runs).

What an extension declares:

- ``request_fields``: its request fields, declared as ``engine.fields.Field``
  with ``owner`` set to its name; the manager registers them in the field
  registry when it loads the extension, so presets, the CLI and the API know
  them. Their values live in ``GenerationRequest.extensions[<name>]``.
- ``fields``: the settings it holds inside its request field, with defaults
  (documentation for API clients).
- ``cli_args(values, studio, model) -> settings``: what its fields' CLI flags
  gave (each flag may be repeated), turned into settings.
- ``cli_commands``: ``{command: CliCommand}``, subcommands of ``launch.py``.
- ``settings``: its own persistent settings, declared as ``Field``s; the
  Settings tab shows them and ``settings.json`` keeps them under its name.
- ``validate(raw) -> settings``: turns raw settings (plain dicts from the UI,
  API or CLI, or settings it validated before) into its own validated form, and
  raises ``engine.errors.ValidationError`` naming the bad field. It must accept
  its own output unchanged, so validating twice is harmless.
- ``step_hooks(context, settings) -> [StepHook]``: per-step additions to the
  UNet call (residuals for its down and mid blocks, ...).
- ``infotext_fields(settings) -> {key: value}`` for the A1111 parameters line,
  and optionally ``parse_infotext(params) -> settings`` to read them back.
- ``api_args(args) -> settings``: A1111's ``alwayson_scripts.<name>.args``.
- ``ui``: ``{tab: builder}``. ``builder(tab)`` creates its controls inside the
  caller's Gradio Blocks and returns ``(components, to_settings, from_settings)``;
  the extension's own UI module imports gradio, the core never does.
- ``api_routes(app, studio)``: optional HTTP endpoints of its own.
- ``setup(env)``: optional start-up call with the folders it may use.

``GenerationRequest.extensions`` may hold raw or validated settings: the
manager validates inside :meth:`ExtensionManager.step_hooks` and
:meth:`ExtensionManager.infotext_fields`, so callers may pass plain dicts. Edges
that want early errors (the UI, the API, the CLI) call
:meth:`ExtensionManager.validate` or :meth:`ExtensionManager.api_args` and put
the validated settings in the request, which also saves decoding images twice.

An extension that fails to import or to set up is logged, listed in
``failed`` with the reason, and skipped; the app still starts. Which
extensions are disabled is kept in a small JSON state file.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import logging
import re
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import atomic_write
from .errors import GenerationError, SfumatoError, ValidationError
from .fields import FIELDS, Field
from .models import BUILTIN_DIR, REPO_ROOT

if TYPE_CHECKING:
    from .engine import HookContext
    from .request import GenerationRequest
    from .sampling.denoiser import StepHook

log = logging.getLogger("sfumato.extensions")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""Folder names that can be extensions: no dots, slashes or leading underscores, so none escapes the folder."""

_NAMESPACES = itertools.count()

UiBuilder = Callable[..., tuple]
"""``builder(tab) -> (components, to_settings(values), from_settings(settings))``."""


@dataclass(frozen=True)
class ExtensionField:
    """One setting an extension adds to a request, with its default and a line of help."""

    name: str
    default: Any
    description: str = ""


@dataclass(frozen=True)
class CliCommand:
    """A ``launch.py`` subcommand an extension adds: ``add_arguments(parser)`` then ``run(args, config) -> exit status``."""

    help: str
    add_arguments: Callable[[Any], None]
    run: Callable[[Any, Any], int]


@dataclass(frozen=True)
class ExtensionEnv:
    """What an extension may use, handed to its ``setup`` at start-up."""

    name: str
    folder: Path  # the extension's own folder
    models_dir: Path  # the A1111-style models folder (``<models_dir>/<kind of model>``, ...)
    builtin_dir: Path | None  # the repo's built-in models
    user_dir: Path  # where the app keeps user state


def _identity(raw: Any) -> Any:
    return raw


@dataclass
class Extension:
    """An extension's declaration. Only ``name`` and ``title`` are required."""

    name: str
    title: str
    description: str = ""
    fields: tuple[ExtensionField, ...] = ()
    request_fields: tuple[Field, ...] = ()
    settings: tuple[Field, ...] = ()
    cli_args: Callable[..., Any] | None = None
    cli_commands: Mapping[str, CliCommand] = field(default_factory=dict)
    validate: Callable[[Any], Any] = _identity
    step_hooks: Callable[["HookContext", Any], list["StepHook"]] | None = None
    infotext_fields: Callable[[Any], dict[str, str]] | None = None
    api_args: Callable[[list], Any] | None = None
    parse_infotext: Callable[[dict], Any] | None = None
    default_settings: Callable[[], Any] | None = None
    ui: Mapping[str, UiBuilder] = field(default_factory=dict)  # tab name ("txt2img", "img2img", "inpaint", or "*") -> builder
    api_routes: Callable[[Any, Any], None] | None = None  # (FastAPI app, studio) -> None
    setup: Callable[[ExtensionEnv], None] | None = None


@dataclass(frozen=True)
class ExtensionStatus:
    """One row of the Extensions tab."""

    name: str
    title: str
    description: str
    state: str  # "enabled", "disabled" or "failed"
    reason: str = ""


class ExtensionManager:
    """Finds, loads, enables and disables extensions; implements the engine's ``ExtensionHost``."""

    def __init__(self, extensions_dir: Path | str, state_file: Path | str, models_dir: Path | str | None = None,
                 builtin_dir: Path | str | None = BUILTIN_DIR):
        self.extensions_dir = Path(extensions_dir)
        self.state_file = Path(state_file)
        self.models_dir = Path(models_dir) if models_dir else REPO_ROOT / "models"
        self.builtin_dir = Path(builtin_dir) if builtin_dir else None
        self._lock = threading.RLock()
        # A private package per manager: two managers never share an extension's module state.
        self._namespace = f"_sfumato_extensions_{next(_NAMESPACES)}"
        namespace = types.ModuleType(self._namespace)
        namespace.__path__ = []  # a package with no folder of its own; extensions are added by path
        sys.modules[self._namespace] = namespace
        self._available: list[str] = []
        self._extensions: dict[str, Extension] = {}
        self._modules: dict[str, types.ModuleType] = {}
        self._failed: dict[str, str] = {}
        self._disabled: set[str] = self._read_state()
        self.refresh()

    # -- discovery and loading -------------------------------------------------
    def refresh(self) -> None:
        """Find extension folders and import the enabled ones that are not imported yet."""
        with self._lock:
            self._available = self._discover()
            for name in self._available:
                if name not in self._disabled and name not in self._extensions and name not in self._failed:
                    self._import(name)

    def _discover(self) -> list[str]:
        if not self.extensions_dir.is_dir():
            return []
        root = self.extensions_dir.resolve()
        names = []
        for entry in sorted(self.extensions_dir.iterdir()):
            if not entry.is_dir() or not NAME_PATTERN.fullmatch(entry.name):
                continue
            if not entry.resolve().is_relative_to(root):
                self._failed[entry.name] = "its folder links outside the extensions folder; copy it in instead"
                log.warning("extension %s skipped: links outside %s", entry.name, root)
                continue
            names.append(entry.name)
        return names

    def _import(self, name: str) -> None:
        folder = self.extensions_dir / name
        init = folder / "__init__.py"
        if not init.is_file():
            self._failed[name] = f"{folder} has no __init__.py"
            log.warning("extension %s skipped: no __init__.py", name)
            return
        module_name = f"{self._namespace}.{name.replace('-', '_')}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            extension = getattr(module, "EXTENSION", None)
            if not isinstance(extension, Extension):
                raise TypeError("its __init__.py must define EXTENSION = engine.extensions.Extension(...)")
            if extension.name != name:
                raise ValueError(f"it declares the name {extension.name!r} but lives in the folder {name!r}")
            for declared in (*extension.request_fields, *extension.settings):
                if declared.owner != name:
                    raise ValueError(f"its field {declared.name!r} must name the extension as its owner, not {declared.owner!r}")
            for declared in extension.request_fields:
                FIELDS.register(declared)
            if extension.setup is not None:
                extension.setup(ExtensionEnv(name, folder, self.models_dir, self.builtin_dir, self.state_file.parent))
        except (Exception, SystemExit) as error:  # noqa: BLE001 - a broken extension must not stop the app
            for loaded in [key for key in sys.modules if key == module_name or key.startswith(module_name + ".")]:
                del sys.modules[loaded]
            self._failed[name] = f"{type(error).__name__}: {error}"
            log.error("extension %s failed to load: %s", name, self._failed[name], exc_info=True)
            return
        self._failed.pop(name, None)
        self._extensions[name] = extension
        self._modules[name] = module
        log.info("extension %s loaded", name)

    # -- state -------------------------------------------------------------------
    def _read_state(self) -> set[str]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as error:
            log.warning("could not read %s (%s); every extension starts enabled", self.state_file, error)
            return set()
        disabled = data.get("disabled", []) if isinstance(data, dict) else []
        return {name for name in disabled if isinstance(name, str) and NAME_PATTERN.fullmatch(name)}

    def _write_state(self, disabled: set[str]) -> None:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write.write_file(self.state_file, json.dumps({"disabled": sorted(disabled)}, indent=2) + "\n")
        except OSError as error:
            raise SfumatoError(f"cannot remember which extensions are enabled in {self.state_file}: "
                               f"{error.strerror or error}; check that folder's permissions and free space") from error

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Enable or disable an extension; remembered across restarts.

        Enabling imports it now, so the engine and API use it at once; its UI
        controls appear after a restart.
        """
        with self._lock:
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name not in self._discover():
                raise ValidationError("extension", f"no extension named {name!r}; found: {', '.join(self._available) or 'none'}")
            disabled = self._disabled - {name} if enabled else self._disabled | {name}
            self._write_state(disabled)  # first: a failed write changes nothing
            self._disabled = disabled
            if enabled and name not in self._extensions:
                self._failed.pop(name, None)
                self._import(name)

    # -- what is there -------------------------------------------------------------
    @property
    def available(self) -> list[str]:
        """Every extension folder found, whatever its state."""
        return list(self._available)

    @property
    def loaded(self) -> dict[str, Extension]:
        """Enabled extensions that imported cleanly, by name."""
        with self._lock:
            return {name: ext for name, ext in self._extensions.items() if name not in self._disabled}

    @property
    def failed(self) -> dict[str, str]:
        """Extensions that could not be loaded, with the reason."""
        with self._lock:
            return {name: reason for name, reason in self._failed.items() if name not in self._disabled}

    @property
    def disabled(self) -> list[str]:
        with self._lock:
            return sorted(name for name in self._disabled if name in self._available)

    def names(self) -> list[str]:
        return list(self.loaded)

    def statuses(self) -> list[ExtensionStatus]:
        """Every extension found, for an Extensions tab."""
        rows = []
        with self._lock:
            for name in self._available:
                ext = self._extensions.get(name)
                title, description = (ext.title, ext.description) if ext else (name, "")
                if name in self._disabled:
                    rows.append(ExtensionStatus(name, title, description, "disabled"))
                elif name in self._failed:
                    rows.append(ExtensionStatus(name, title, description, "failed", self._failed[name]))
                elif ext is not None:
                    rows.append(ExtensionStatus(name, title, description, "enabled"))
        return rows

    def get(self, name: str) -> Extension:
        extension = self.loaded.get(name)
        if extension is None:
            raise ValidationError("extensions", f"no enabled extension named {name!r}; enabled: {', '.join(self.loaded) or 'none'}")
        return extension

    def module(self, name: str) -> types.ModuleType:
        """The imported package of an enabled extension."""
        self.get(name)
        return self._modules[name]

    def submodule(self, name: str, submodule: str) -> types.ModuleType:
        """A module inside an enabled extension's package, e.g. ``submodule("<name>", "api")``."""
        if not NAME_PATTERN.fullmatch(submodule.replace(".", "_")):
            raise ValidationError("submodule", f"{submodule!r} is not a module name")
        return importlib.import_module(f"{self.module(name).__name__}.{submodule}")

    # -- settings ------------------------------------------------------------------
    def validate(self, name: str, raw: Any) -> Any:
        """An extension's validated settings from raw ones (raises ValidationError naming the field)."""
        return self.get(name).validate(raw)

    def default_settings(self, name: str) -> Any:
        extension = self.get(name)
        return extension.default_settings() if extension.default_settings else None

    def cli_args(self, name: str, values: list[str], **context: Any) -> Any:
        """Settings from an extension's CLI flags (``context``: the studio and the model in use)."""
        extension = self.get(name)
        if extension.cli_args is None:
            raise ValidationError(name, "this extension takes no command-line flags")
        return extension.cli_args(values, **context)

    def api_args(self, name: str, args: Any) -> Any:
        """Settings from A1111's ``alwayson_scripts.<name>.args``."""
        extension = self.get(name)
        return (extension.api_args or extension.validate)(args)

    def parse_infotext(self, params: Mapping[str, str]) -> dict[str, Any]:
        """Each extension's settings read back from infotext parameters (only those that found theirs)."""
        settings = {}
        for name, extension in self.loaded.items():
            if extension.parse_infotext is None:
                continue
            try:
                parsed = extension.parse_infotext(dict(params))
            except Exception:  # noqa: BLE001 - unreadable infotext must not break the PNG Info tab
                log.warning("extension %s could not read infotext", name, exc_info=True)
                continue
            if parsed is not None:
                settings[name] = parsed
        return settings

    def ui_builders(self, tab: str) -> list[tuple[str, UiBuilder]]:
        """``(name, builder)`` for each enabled extension with controls on ``tab``."""
        builders = []
        for name, extension in self.loaded.items():
            builder = extension.ui.get(tab) or extension.ui.get("*")
            if builder is not None:
                builders.append((name, builder))
        return builders

    # -- the engine's ExtensionHost --------------------------------------------------
    def _settings(self, request: "GenerationRequest") -> list[tuple[str, Extension, Any]]:
        found = []
        for name, extension in self.loaded.items():
            raw = request.extensions.get(name)
            if raw is None:
                continue
            try:
                found.append((name, extension, extension.validate(raw)))
            except ValidationError as error:
                raise ValidationError(f"extensions.{name}.{error.field}", error.message) from None
        return found

    def step_hooks(self, context: "HookContext") -> list["StepHook"]:
        hooks: list = []
        for name, extension, settings in self._settings(context.request):
            if extension.step_hooks is None:
                continue
            try:
                hooks.extend(extension.step_hooks(context, settings))
            except ValidationError as error:
                raise ValidationError(f"extensions.{name}.{error.field}", error.message) from None
            except SfumatoError:
                raise
            except Exception as error:
                log.exception("extension %s failed to prepare its step hooks", name)
                raise GenerationError(f"extension {name} failed: {type(error).__name__}: {error}") from error
        return hooks

    def infotext_fields(self, request: "GenerationRequest") -> dict[str, str]:
        fields: dict[str, str] = {}
        for name, extension, settings in self._settings(request):
            if extension.infotext_fields is None:
                continue
            try:
                fields.update(extension.infotext_fields(settings))
            except Exception:  # noqa: BLE001 - a missing infotext entry must not cost the image
                log.exception("extension %s failed to write its infotext", name)
        return fields
