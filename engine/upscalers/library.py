"""Every pixel upscaler a user can pick, in A1111's order, found by name.

The list is A1111's ``sd_upscalers`` for pixels: "None", "Lanczos", "Nearest", then the model files (see
``model_files.py``) by name. The latent modes (``latent.py``) are hires fix's alone and listed apart
(``LATENT_UPSCALE_MODES``). A file whose problem is known (unreadable, unrecognised, not an upscaler) is still
listed, with its reason, so the user sees why it is not offered; ``find`` refuses it with that reason.
"""
from __future__ import annotations

import difflib
import threading
from pathlib import Path

import torch
from PIL import Image

from ..devices import pick_device, pick_dtype
from ..errors import ValidationError
from .latent import LATENT_UPSCALE_MODES
from .model_files import ModelUpscaler, UpscalerFile, find_files, inspect_file
from .pixel import RESAMPLERS, PixelUpscaler

NONE = "None"
BUILT_IN = (NONE, *RESAMPLERS)  # what every list begins with, in A1111's order


class NoUpscale:
    """A1111's "None": no upscaler, only a plain Lanczos resize to the size asked for (what A1111's
    ``resize_image`` does with no upscaler; the Extras tab skips the upscale altogether for it)."""

    name, native_scale = NONE, None

    def upscale(self, image: Image.Image, width: int, height: int) -> Image.Image:
        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


class UpscalerLibrary:
    """The upscaler files under ``models_dir`` plus the built-in resamplers; models run on ``device`` in ``dtype``."""

    def __init__(self, models_dir: Path | str | None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.models_dir = Path(models_dir) if models_dir else None
        self.device = device or pick_device()
        self.dtype = dtype or pick_dtype(self.device)
        self._lock = threading.Lock()
        self._files: dict[str, UpscalerFile] = {}
        self._inspected: dict[tuple, UpscalerFile] = {}  # by (path, size, mtime): a refresh re-reads changed files only
        self.refresh()

    def refresh(self) -> list[UpscalerFile]:
        files: dict[str, UpscalerFile] = {}
        inspected: dict[tuple, UpscalerFile] = {}
        for path in find_files(self.models_dir):
            try:
                stat = path.stat()
            except OSError:
                continue
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            file = self._inspected.get(key) or inspect_file(path)
            inspected[key] = file
            if file.name in files or file.name in BUILT_IN:  # the first of a name wins
                taken = files[file.name].path.as_posix() if file.name in files else "a built-in upscaler"
                file = UpscalerFile(file.name, path, file.architecture,
                                    problem=f"{path.name}: {taken} already has the name {file.name}; rename one of them")
                files[path.relative_to(self.models_dir).as_posix()] = file
                continue
            files[file.name] = file
        with self._lock:
            self._files, self._inspected = files, inspected
        return self.files()

    def files(self) -> list[UpscalerFile]:
        with self._lock:
            return list(self._files.values())

    def names(self) -> list[str]:
        """What a picker offers, in A1111's order: None, Lanczos, Nearest, then the usable model files."""
        return [*BUILT_IN, *(file.name for file in self.files() if file.problem is None)]

    def find(self, name: str, field: str = "upscaler") -> PixelUpscaler:
        """The upscaler called ``name``; ValidationError(field) naming the closest names when there is none,
        and with the reason when the file is known to be broken."""
        if name == NONE:
            return NoUpscale()
        if name in LATENT_UPSCALE_MODES:
            raise ValidationError(field, f"{name} is a latent upscale mode, which hires fix runs on latents; "
                                         f"a pixel upscaler is one of {', '.join(self.names())}")
        if name in RESAMPLERS:
            return RESAMPLERS[name]
        with self._lock:
            file = self._files.get(name)
        if file is None:
            known = self.names()
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValidationError(field, f"no upscaler named {name!r}; {hint}choose one of {', '.join(known)}")
        if file.problem:
            raise ValidationError(field, file.problem)
        return ModelUpscaler(file, self.device, self.dtype, on_failure=self._mark_broken)

    def _mark_broken(self, file: UpscalerFile, problem: str) -> None:
        """A file that looked right but failed to load is listed with the reason from then on (until it changes)."""
        broken = UpscalerFile(file.name, file.path, file.architecture, problem=problem)
        with self._lock:
            self._files = {name: broken if known is file else known for name, known in self._files.items()}
            self._inspected = {key: broken if known is file else known for key, known in self._inspected.items()}
