"""Data flows one way: the engine never imports the UI toolkit, the core never imports an extension by name."""
from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_imports_no_gradio():
    modules = [f"engine.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "engine")])]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False")


def test_core_never_names_an_extension():
    pattern = re.compile(r"^\s*(from|import)\s+extensions\b", re.M)
    offenders = [p for folder in ("engine", "ui") for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text())]
    assert [p.relative_to(ROOT).as_posix() for p in offenders] == []


# "Is this SDXL?" and its cousins: a name test, a family-name comparison, or a structural test that stands
# for one (a second text encoder, SDXL's added conditioning, an SDXL pipeline class picked by hand).
FAMILY_TESTS = re.compile(
    r"\bis_xl\b"
    r"|(==|!=)\s*[\"'](sd1|sd15|sd2|sdxl|sd3|flux)[\"']|[\"'](sd1|sd15|sd2|sdxl|sd3|flux)[\"']\s*(==|!=)"
    r"|\bin\s*[\(\[{]\s*[\"'](sd1|sd15|sd2|sdxl)[\"']"
    r"|family\.(id|name|title)\s*(==|!=|\bin\b)"
    r"|[\"']text_encoder_2[\"']\s*,\s*None\)\s*is\s*(not\s*)?None"
    r"|[\"']text_time[\"']|\baddition_embed_type\b|cross_attention_dim[\"']\)\s*==\s*\d"
    r"|\bStableDiffusionXL\w*Pipeline\b"
)
# Files that may hold family facts: the family files themselves, and the tiny-model builders (which construct
# each family's fixture, and so name its pipeline and conditioning).
FAMILY_HOMES = ("engine/families/", "engine/tiny_models.py")


def family_tests_in(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if FAMILY_TESTS.search(line)]


def test_the_family_test_pattern_catches_the_ways_code_asked_is_it_sdxl():
    caught = ['if model.family.is_xl:', 'cls = StableDiffusionXLPipeline if x else y', 'if layout.family == "sdxl":',
              'xl = getattr(pipeline, "text_encoder_2", None) is not None', 'if config.get("addition_embed_type") == "text_time":',
              'if family.name in ("sd1", "sd2"):', 'return "sdxl" == kind', 'if unet.get("cross_attention_dim") == 1024:',
              'kwargs = {"added_cond_kwargs": added} if controlnet.config.get("addition_embed_type") else {}']
    assert [line for line in caught if not family_tests_in(line)] == []
    assert family_tests_in('prompt_encoder=family.prompt_encoder(pipeline)\nfolder = CONFIGS_DIR / family.id') == []


def test_no_family_is_tested_outside_the_family_files():
    offenders = []
    for folder in ("engine", "ui", "extensions", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(FAMILY_HOMES):
                continue
            offenders += [f"{relative}: {line}" for line in family_tests_in(path.read_text())]
    assert offenders == []


def extension_names() -> list[str]:
    """Every extension the repository ships: a folder under extensions/ holding a package."""
    return sorted(entry.name for entry in (ROOT / "extensions").iterdir() if (entry / "__init__.py").is_file())


def naming_pattern(names: list[str]) -> re.Pattern:
    """An extension's name anywhere in the text (code, strings, comments), in any case, as a word of its own.

    Underscores and other punctuation separate words, so ``controlnet_units`` and ``/controlnet/`` count;
    a longer word that merely contains the name does not.
    """
    return re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(name) for name in names) + r")(?![A-Za-z0-9])", re.I)


def core_files_naming(names: list[str]) -> dict[str, list[str]]:
    pattern = naming_pattern(names)
    found: dict[str, list[str]] = {}
    for folder in ("engine", "ui"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    found.setdefault(path.relative_to(ROOT).as_posix(), []).append(f"{number}: {line.strip()}")
    return found


def test_core_files_never_name_an_extension_in_code_strings_or_comments():
    names = extension_names()
    assert names, "the repository ships at least one extension to check against"
    assert core_files_naming(names) == {}


def test_the_name_check_sees_strings_comments_and_identifiers():
    pattern = naming_pattern(["myext"])
    for line in ('x = "myext"', "# the MyExt units", "myext_units: int = 3", 'API = ("/myext/",)', "MyExt 0: ..."):
        assert pattern.search(line), line
    for line in ("myextension = 1", "notmyext", "my ext"):
        assert not pattern.search(line), line
