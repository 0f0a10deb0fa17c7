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
