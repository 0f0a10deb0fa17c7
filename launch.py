#!/usr/bin/env python3
"""Sfumato launcher: sets up .venv with the pinned dependencies, then runs a command.

    python launch.py              start the studio on http://127.0.0.1:7860
    python launch.py test         run the test suite
    python launch.py generate ... headless generation
    python launch.py --help       every command and flag

Only the standard library is used before the virtual environment exists.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_NO_DEPS = ROOT / "requirements-nodeps.txt"
STAMP = VENV / ".sfumato-requirements"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_digest() -> str:
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, REQUIREMENTS_NO_DEPS):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    """Create .venv and install the pinned set once; later starts only compare a stamp."""
    if STAMP.exists() and STAMP.read_text().strip() == requirements_digest() and venv_python().exists():
        return
    if sys.version_info[:2] != (3, 11):
        print(f"warning: Sfumato is tested on Python 3.11; this is {sys.version.split()[0]}", file=sys.stderr)
    if not venv_python().exists():
        print(f"Creating virtual environment in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check"]
    print("Installing pinned dependencies (first start only; torch is pinned to 2.13.0) ...", flush=True)
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([*pip, "--no-deps", "-r", str(REQUIREMENTS_NO_DEPS)], check=True)
    STAMP.write_text(requirements_digest())


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def main() -> int:
    if "--skip-install" not in sys.argv:
        try:
            ensure_environment()
        except subprocess.CalledProcessError as error:
            print(f"error: installing dependencies failed ({error}); see the pip output above", file=sys.stderr)
            return 1
    if not in_venv():
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.call([str(venv_python()), str(Path(__file__).resolve()), *sys.argv[1:]], env=env)
    sys.path.insert(0, str(ROOT))
    from ui.cli import main as cli_main

    return cli_main([arg for arg in sys.argv[1:] if arg != "--skip-install"])


if __name__ == "__main__":
    sys.exit(main())
