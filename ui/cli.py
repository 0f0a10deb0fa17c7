"""Command line: serve the studio, run tests, generate headless, preprocess, bench.

``launch.py`` sets up the environment and hands its arguments here.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 7860

# Request field -> the flag that sets it, so a validation error names what the user typed.
FLAG_FOR_FIELD = {
    "prompt": "--prompt", "negative_prompt": "--negative", "model": "--model", "sampler": "--sampler",
    "schedule": "--schedule", "steps": "--steps", "cfg_scale": "--cfg", "width": "--width", "height": "--height",
    "seed": "--seed", "batch_size": "--batch-size", "batch_count": "--batch-count", "init_image": "--init-image",
    "denoising_strength": "--strength", "resize_mode": "--resize-mode", "mask": "--mask", "mask_blur": "--mask-blur",
    "masked_content": "--masked-content", "inpaint_area": "--inpaint-area", "inpaint_padding": "--padding",
    "invert_mask": "--invert-mask", "outpaint": "--outpaint", "zero_terminal_snr": "--zero-terminal-snr",
    "subseed": "--variation-seed", "subseed_strength": "--variation-strength", "controlnet": "--control",
}
RESIZE_MODES = {"just-resize": "Just resize", "crop-and-resize": "Crop and resize", "resize-and-fill": "Resize and fill"}
MASKED_CONTENT = {"fill": "fill", "original": "original", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}
INPAINT_AREAS = {"whole": "Whole picture", "masked": "Only masked"}


class CliError(Exception):
    """A one-line message for the user; exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description="Sfumato: a local image-generation studio.")
    add_common(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for the UI and API (default 7860)")
    parser.add_argument("--listen", action="store_true", help="bind 0.0.0.0 so other machines can connect (default 127.0.0.1)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("--api", action="store_true", help="serve the AUTOMATIC1111-compatible /sdapi/v1 API")
    parser.add_argument("--auth", help="user:pass protecting the UI and API")
    parser.add_argument("--auth-file", help="file with user:pass lines")
    parser.add_argument("--api-auth", help="user:pass protecting only the API")
    parser.add_argument("--allowed-hosts", metavar="HOST[,HOST...]",
                        help="more host names the server answers to, e.g. a reverse proxy's or a DNS name "
                             "(default: 127.0.0.1, localhost, [::1]; with --listen also this machine's names and addresses)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="start the studio (the default)")
    commands.add_parser("test", help="run the test suite (extra arguments go to pytest)")
    generate = commands.add_parser("generate", help="generate images without the UI")
    add_common(generate)
    add_generate_args(generate)
    preprocess = commands.add_parser("preprocess", help="write a ControlNet preprocessor's map")
    add_common(preprocess)
    preprocess.add_argument("--module", required=True, help="preprocessor name, e.g. canny")
    preprocess.add_argument("image", help="input image")
    preprocess.add_argument("--out", required=True, help="output PNG path")
    preprocess.add_argument("--resolution", type=int, default=512, help="preprocessor resolution")
    commands.add_parser("bench", help="run the benchmarks (extra arguments go to bench)")
    commands.add_parser("train-demo", help="train the built-in demo model (extra arguments go to the trainer)")
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default=argparse.SUPPRESS, help="A1111-style models folder (default ./models)")
    parser.add_argument("--outputs-dir", default=argparse.SUPPRESS, help="where images are saved (default ./outputs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=argparse.SUPPRESS, help="compute device (default auto)")
    parser.add_argument("--medvram", action="store_true", default=argparse.SUPPRESS, help="GPU: offload idle models to the CPU (slower, less VRAM)")
    parser.add_argument("--lowvram", action="store_true", default=argparse.SUPPRESS, help="GPU: offload layer by layer (slowest, least VRAM)")
    parser.add_argument("--vae-tiling", action="store_true", default=argparse.SUPPRESS, help="decode large images in tiles (pixels differ near seams)")
    parser.add_argument("--compile", action="store_true", default=argparse.SUPPRESS, help="torch.compile the UNet (slow first run)")


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=None, help="the prompt")
    parser.add_argument("--prompts-file", help="one generation per line of this file, same settings")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--model", help="model name (see the UI's model list); default: the default model")
    parser.add_argument("--vae", default="Automatic", help="Automatic, None (the checkpoint's own) or a file in models/VAE")
    parser.add_argument("--sampler", default="DPM++ 2M")
    parser.add_argument("--schedule", default="Automatic")
    parser.add_argument("--zero-terminal-snr", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--variation-seed", type=int, default=-1)
    parser.add_argument("--variation-strength", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batch-count", type=int, default=1)
    parser.add_argument("--init-image", help="img2img/inpaint source image")
    parser.add_argument("--strength", type=float, default=0.75, help="denoising strength 0..1")
    parser.add_argument("--resize-mode", choices=tuple(RESIZE_MODES), default="just-resize")
    parser.add_argument("--mask", help="inpaint mask image (white = repaint)")
    parser.add_argument("--mask-blur", type=int, default=4)
    parser.add_argument("--masked-content", choices=tuple(MASKED_CONTENT), default="original")
    parser.add_argument("--inpaint-area", choices=tuple(INPAINT_AREAS), default="whole")
    parser.add_argument("--padding", type=int, default=32, help="only-masked padding in pixels")
    parser.add_argument("--invert-mask", action="store_true", help="inpaint what is NOT masked")
    parser.add_argument("--outpaint", help="grow the canvas: left,right,up,down in pixels")
    parser.add_argument("--control", action="append", default=[], help="ControlNet unit IMAGE,MODULE[,MODEL[,WEIGHT[,START,END]]] (repeatable)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")


def studio_config(args: argparse.Namespace):
    from engine.performance import PerformanceOptions
    from engine.studio import StudioConfig

    config = StudioConfig()
    if getattr(args, "models_dir", None):
        config.models_dir = Path(args.models_dir).resolve()
    if getattr(args, "outputs_dir", None):
        config.outputs_dir = Path(args.outputs_dir).resolve()
    if getattr(args, "device", None):
        config.device = args.device
    memory_mode = "lowvram" if getattr(args, "lowvram", False) else "medvram" if getattr(args, "medvram", False) else "normal"
    config.performance = PerformanceOptions(memory_mode=memory_mode, vae_tiling=getattr(args, "vae_tiling", False),
                                            compile=getattr(args, "compile", False))
    return config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = args.command or "serve"
    if extra and command not in ("test", "bench", "train-demo"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if command == "test":
            return run_tests(extra)
        if command == "bench":
            return subprocess.call([sys.executable, "-m", "bench", *extra], cwd=ROOT)
        if command == "train-demo":
            return subprocess.call([sys.executable, "-m", "training.demo_model", *extra], cwd=ROOT)
        if command == "generate":
            return run_generate(args)
        if command == "preprocess":
            return run_preprocess(args)
        return run_server(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_tests(extra: list[str]) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    status = subprocess.call([sys.executable, "-m", "pytest", *(extra or ["tests"])], cwd=ROOT, env=env)
    if status == 5:
        print("error: pytest collected no tests; that counts as a failure", file=sys.stderr)
        return 1
    return status


# -- generate -----------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> int:
    from engine import SfumatoError, ValidationError
    from engine.image_metadata import save_png

    prompts = read_prompts(args)
    requests = []
    for prompt in prompts:
        try:
            requests.append(build_request(args, prompt))
        except ValidationError as error:
            raise CliError(f"{FLAG_FOR_FIELD.get(error.field.split('.')[0], error.field)}: {error.message}") from None
    from engine.studio import Studio

    studio = Studio(studio_config(args))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"--out: cannot create {out}: {error.strerror}") from None
    index = len(list(out.glob("*.png")))
    for request in requests:
        request = resolve_extensions(studio, request, args)
        try:
            result = studio.engine.generate(request)
        except ValidationError as error:
            raise CliError(f"{FLAG_FOR_FIELD.get(error.field.split('.')[0], error.field)}: {error.message}") from None
        except SfumatoError as error:
            raise CliError(str(error)) from None
        for generated in result.images:
            path = unique_path(out, index, generated.seed)
            save_png(generated.image, path, generated.infotext)
            index += 1
            print(f"{path} {generated.seed}", flush=True)
    return 0


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise CliError(f"--prompts-file: cannot read {args.prompts_file}: {error.strerror}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise CliError(f"--prompts-file: {args.prompts_file} has no prompts")
        return prompts
    if args.prompt is None:
        raise CliError("--prompt: give a prompt (or --prompts-file)")
    return [args.prompt]


def unique_path(folder: Path, index: int, seed: int) -> Path:
    while True:
        path = folder / f"{index:05d}-{seed}.png"
        if not path.exists():
            return path
        index += 1


def open_image(path: str, flag: str):
    from engine.errors import ValidationError
    from engine.untrusted_images import read_untrusted_image

    if not Path(path).is_file():
        raise CliError(f"{flag}: no such file: {path}")
    try:
        return read_untrusted_image(path, flag)
    except ValidationError as error:
        raise CliError(f"{flag}: {path}: {error.message}") from None


def parse_outpaint(text: str | None) -> tuple[int, int, int, int]:
    if not text:
        return (0, 0, 0, 0)
    parts = text.split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise CliError(f"--outpaint: expected four integers left,right,up,down; got {text!r}") from None
    if len(values) != 4:
        raise CliError(f"--outpaint: expected four integers left,right,up,down; got {text!r}")
    return values  # type: ignore[return-value]


def build_request(args: argparse.Namespace, prompt: str):
    from engine import GenerationRequest

    return GenerationRequest(
        prompt=prompt, negative_prompt=args.negative, model=args.model, sampler=args.sampler, schedule=args.schedule,
        zero_terminal_snr=args.zero_terminal_snr, steps=args.steps, cfg_scale=args.cfg, width=args.width, height=args.height,
        seed=args.seed, subseed=args.variation_seed, subseed_strength=args.variation_strength,
        batch_size=args.batch_size, batch_count=args.batch_count,
        init_image=open_image(args.init_image, "--init-image") if args.init_image else None,
        denoising_strength=args.strength, resize_mode=RESIZE_MODES[args.resize_mode],
        mask=open_image(args.mask, "--mask") if args.mask else None, mask_blur=args.mask_blur,
        invert_mask=args.invert_mask, masked_content=MASKED_CONTENT[args.masked_content],
        inpaint_area=INPAINT_AREAS[args.inpaint_area], inpaint_padding=args.padding, outpaint=parse_outpaint(args.outpaint),
        vae=args.vae,
    )


def resolve_extensions(studio, request, args: argparse.Namespace):
    """Turn --control flags into the ControlNet extension's settings."""
    if not args.control:
        return request
    if "controlnet" not in studio.extensions.loaded:
        raise CliError("--control: the ControlNet extension is not loaded (see the Extensions tab)")
    from engine import ValidationError

    try:
        parse_control_arg = studio.extensions.submodule("controlnet", "cli").parse_control_arg
        units = [parse_control_arg(text, studio=studio, model=request.model) for text in args.control]
        settings = studio.extensions.validate("controlnet", units)
    except ValidationError as error:
        raise CliError(f"--control: {error.message}") from None
    return request.with_changes(extensions={**request.extensions, "controlnet": settings})


def run_preprocess(args: argparse.Namespace) -> int:
    from engine import SfumatoError
    from engine.extensions import ExtensionManager

    config = studio_config(args)
    manager = ExtensionManager(config.extensions_dir, config.user_dir / "extensions.json", models_dir=config.models_dir,
                               builtin_dir=config.builtin_models_dir)
    if "controlnet" not in manager.loaded:
        reason = manager.failed.get("controlnet", "it is disabled")
        raise CliError(f"the ControlNet extension is not available: {reason}")
    try:
        preprocess = manager.submodule("controlnet", "cli").run_preprocess
        preprocess(args.module, args.image, args.out, args.resolution, models_dir=config.models_dir)
    except SfumatoError as error:
        raise CliError(str(error)) from None
    print(args.out)
    return 0


# -- serve ----------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> int:
    from engine.studio import Studio
    from ui.server import listen_warning, parse_allowed_hosts, parse_auth, serve

    try:
        auth = parse_auth(args.auth, args.auth_file)
        api_auth = parse_auth(args.api_auth, None)
    except ValueError as error:
        raise CliError(f"--auth: {error}") from None
    try:
        allowed_hosts = parse_allowed_hosts(args.allowed_hosts)
    except ValueError as error:
        raise CliError(str(error)) from None
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    studio = Studio(studio_config(args))
    warning = listen_warning(args.listen, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    url = f"http://127.0.0.1:{args.port}"
    handle = serve(studio, host=host, port=args.port, api=args.api, auth=auth, api_auth=api_auth, listen=args.listen, block=False,
                   allowed_hosts=allowed_hosts)
    print(f"Sfumato is running on {url}  (Ctrl+C to stop)", flush=True)
    if not args.no_browser and os.environ.get("DISPLAY") or sys.platform in ("darwin", "win32") and not args.no_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        handle.wait()
    except KeyboardInterrupt:
        handle.stop()
    return 0
