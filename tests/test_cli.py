"""`launch.py generate` and friends: the same engine call as the UI, scriptable.

Two tests start ``launch.py`` as a real process (a generation, and an argument error's exit status), so the entry
point itself is covered; the rest call the CLI's own ``main`` in this process, with its stdout, stderr and exit
status captured, which saves a torch and diffusers import (10-20 s on CI) per test.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, models_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "launch.py"), "--skip-install", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def run_cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``ui.cli.main`` in this process, as ``launch.py`` calls it: exit status (argparse's ``SystemExit`` included),
    stdout and stderr, shaped like ``run_cli``'s result."""
    from ui.cli import main

    capsys.readouterr()  # drop whatever earlier code printed
    try:
        status = main(list(args))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["launch.py", *args], status, captured.out, captured.err)


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory, tiny_models_dir):
    out = tmp_path_factory.mktemp("cli")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    result = run_cli("generate", "--models-dir", str(tiny_models_dir), "--model", "Stable-diffusion/tiny-sd1",
                     "--prompts-file", str(prompts), "--steps", "3", "--seed", "77", "--batch-size", "2",
                     "--width", "64", "--height", "64", "--sampler", "DPM++ 2M Karras", "--out", str(out / "png"),
                     models_dir=tiny_models_dir)
    return out, result


def test_generate_writes_pngs_with_metadata_and_prints_path_and_seed(cli_out):
    out, result = cli_out
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4  # two prompts × batch of two
    seeds = []
    for line in lines:
        path, seed = line.rsplit(" ", 1)
        seeds.append(int(seed))
        with Image.open(path) as image:
            assert image.size == (64, 64)
            info = image.info["parameters"]
        assert f"Seed: {seed}" in info and "Sampler: DPM++ 2M, Schedule type: Karras" in info and "Steps: 3" in info
    assert seeds == [77, 78, 77, 78]
    assert "a blue square" in Image.open(lines[2].rsplit(" ", 1)[0]).info["parameters"]


def test_generate_matches_the_engine(cli_out, engine):
    from engine import GenerationRequest

    _, result = cli_out
    path = result.stdout.splitlines()[0].rsplit(" ", 1)[0]
    direct = engine.generate(GenerationRequest(prompt="a red circle", model="Stable-diffusion/tiny-sd1", steps=3, seed=77,
                                               width=64, height=64, sampler="DPM++ 2M", schedule="Karras", cfg_scale=7.0))
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(direct.images[0].image))


def _infotext(stdout: str) -> str:
    with Image.open(stdout.strip().splitlines()[0].rsplit(" ", 1)[0]) as image:
        return image.info["parameters"]


def test_settings_not_given_are_the_models_own_and_flags_given_win(tmp_path, tiny_models_dir, capsys):
    """As picking a model in the UI sets them: the flow demo draws with its card's Euler, Simple and CFG 3 (a UNet
    model with A1111's DPM++ 2M and CFG 7) unless a flag says otherwise; a sampler given keeps its own schedule."""
    base = ("generate", "--models-dir", str(tiny_models_dir), "--prompt", "a red circle", "--steps", "2")
    flow = run_cli_here(capsys, *base, "--model", "sfumato-demo-flow", "--out", str(tmp_path / "flow"))
    assert flow.returncode == 0, flow.stderr
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 3," in _infotext(flow.stdout)
    chosen = run_cli_here(capsys, *base, "--model", "sfumato-demo-flow", "--cfg", "5", "--sampler", "DPM++ 2M Karras",
                          "--out", str(tmp_path / "chosen"))
    assert chosen.returncode == 0, chosen.stderr
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5," in _infotext(chosen.stdout)
    unet = run_cli_here(capsys, *base, "--model", "Stable-diffusion/tiny-sd1", "--out", str(tmp_path / "unet"))
    assert unet.returncode == 0, unet.stderr
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7," in _infotext(unet.stdout)


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "x", "--steps", "500"], "--steps"),
    (["--prompt", "x", "--width", "100"], "--width"),
    (["--prompt", "x", "--sampler", "Bogus"], "--sampler"),
    (["--prompt", "x", "--init-image", "/nonexistent.png"], "--init-image"),
    (["--prompt", "x", "--outpaint", "1,2"], "--outpaint"),
    (["--steps", "3"], "--prompt"),
])
def test_invalid_arguments_exit_nonzero_with_one_line_naming_the_argument(tmp_path, tiny_models_dir, capsys, args, needle):
    result = run_cli_here(capsys, "generate", "--models-dir", str(tiny_models_dir), *args, "--out", str(tmp_path))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and needle in message[0], result.stderr


def test_launch_py_exits_nonzero_with_one_line_naming_the_argument(tmp_path, tiny_models_dir):
    """The entry point passes the CLI's exit status and its one-line error through a real process."""
    result = run_cli("generate", "--models-dir", str(tiny_models_dir), "--prompt", "x", "--width", "100", "--out",
                     str(tmp_path), models_dir=tiny_models_dir)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "--width" in message[0], result.stderr


def test_inpaint_from_the_command_line_keeps_unmasked_pixels(tmp_path, tiny_models_dir, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = run_cli_here(capsys, "generate", "--models-dir", str(tiny_models_dir), "--model", "Stable-diffusion/tiny-sd1",
                          "--prompt", "x", "--steps", "3", "--init-image", str(tmp_path / "in.png"), "--mask",
                          str(tmp_path / "mask.png"), "--mask-blur", "0", "--masked-content", "latent-noise",
                          "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = np.asarray(Image.open(result.stdout.split()[0]))
    original = np.asarray(Image.open(tmp_path / "in.png"))
    assert np.array_equal(out[mask == 0], original[mask == 0]) and not np.array_equal(out[mask > 0], original[mask > 0])
    assert "Masked content: latent noise" in Image.open(result.stdout.split()[0]).info["parameters"]


def test_help_lists_the_flags(capsys):
    result = run_cli_here(capsys, "--help")
    assert result.returncode == 0
    for flag in ("--port", "--listen", "--models-dir", "--outputs-dir", "--device", "--no-browser", "generate", "test"):
        assert flag in result.stdout


def test_preprocess_writes_a_canny_map(tmp_path, tiny_models_dir, capsys):
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    Image.fromarray(image).save(tmp_path / "square.png")
    result = run_cli_here(capsys, "preprocess", "--models-dir", str(tiny_models_dir), "--module", "canny",
                          str(tmp_path / "square.png"), "--out", str(tmp_path / "map.png"), "--resolution", "64")
    assert result.returncode == 0, result.stderr
    edges = np.asarray(Image.open(tmp_path / "map.png").convert("L"))
    assert edges.shape == (64, 64) and set(np.unique(edges)) <= {0, 255}
    assert edges[14:18, 20:44].max(axis=0).min() == 255 and edges[24:40, 24:40].max() == 0  # on the border, not inside
