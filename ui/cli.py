"""Command line: serve the studio, run tests, generate headless, bench, and the commands extensions add.

``generate`` has one flag per request field that declares one in ``engine.fields``.

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


class CliError(Exception):
    """A one-line message for the user; exit status 2."""


def flag_for(field_name: str) -> str:
    """The flag that sets a request field, so a validation error names what the user typed."""
    from engine.fields import FIELDS

    declared = FIELDS.get(field_name.split(".")[0])
    return declared.cli if declared is not None and declared.cli else field_name


def build_parser(extensions=None) -> argparse.ArgumentParser:
    """The launcher's parser; ``extensions`` (an ExtensionManager) adds the loaded extensions' flags and commands."""
    parser = argparse.ArgumentParser(prog="launch.py", description="Sfumato: a local image-generation studio.")
    add_common(parser)
    add_server_args(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="start the studio (the default); --replicas N runs its jobs on N engine replicas (Ray Serve)")
    add_common(serve)
    add_server_args(serve, suppress=True)
    add_scale_args(serve)
    commands.add_parser("test", help="run the test suite (extra arguments go to pytest)")
    generate = commands.add_parser("generate", help="generate images without the UI")
    add_common(generate)
    add_generate_args(generate)
    for name, command in extension_commands(extensions).items():
        extra = commands.add_parser(name, help=command.help)
        add_common(extra)
        command.add_arguments(extra)
    commands.add_parser("bench", help="run the benchmarks (extra arguments go to bench)")
    commands.add_parser("train-demo", help="train the built-in demo model (extra arguments go to the trainer; "
                                           "--flow trains the SD3-layout flow demo, training.demo_flow)")
    return parser


def add_server_args(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The server's flags; ``suppress`` for the ``serve`` command's copy, so one given before ``serve`` is kept."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--port", type=int, default=default(DEFAULT_PORT), help="port for the UI and API (default 7860)")
    parser.add_argument("--listen", action="store_true", default=default(False),
                        help="bind 0.0.0.0 so other machines can connect (default 127.0.0.1)")
    parser.add_argument("--no-browser", action="store_true", default=default(False), help="do not open a browser tab")
    parser.add_argument("--api", action="store_true", default=default(False), help="serve the AUTOMATIC1111-compatible /sdapi/v1 API")
    parser.add_argument("--auth", default=default(None), help="user:pass protecting the UI and API")
    parser.add_argument("--auth-file", default=default(None), help="file with user:pass lines")
    parser.add_argument("--api-auth", default=default(None), help="user:pass protecting only the API")
    parser.add_argument("--allowed-hosts", metavar="HOST[,HOST...]", default=default(None),
                        help="more host names the server answers to, e.g. a reverse proxy's or a DNS name "
                             "(default: 127.0.0.1, localhost, [::1]; with --listen also this machine's names and addresses)")


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    """``serve``'s flags for running jobs on engine replicas over Ray Serve (``engine.replicas``)."""
    parser.add_argument("--replicas", metavar="N|auto",
                        help="run jobs on N engine replicas, each on its own device (auto: one per GPU); starts a local Ray "
                             "on 127.0.0.1 unless --ray-address is given")
    parser.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead")
    parser.add_argument("--min-replicas", type=int, help="autoscale: never fewer replicas than this (Ray Serve autoscaling)")
    parser.add_argument("--max-replicas", type=int, help="autoscale: never more replicas than this (Ray Serve autoscaling)")
    parser.add_argument("--threads-per-replica", type=int, default=1, help="torch threads (and CPUs) per CPU replica (default 1)")


def scale_out(args: argparse.Namespace):
    """The ``ScaleOut`` the serve flags ask for, or None to run jobs in this process as usual."""
    flags = (getattr(args, name, None) for name in ("replicas", "ray_address", "min_replicas", "max_replicas"))
    if all(flag is None for flag in flags):
        return None
    from engine.replicas import ScaleOut
    from engine.replicas.cluster import AUTO

    replicas = args.replicas or (AUTO if args.ray_address else 1)
    if replicas != AUTO and not str(replicas).isdigit():
        raise CliError(f"--replicas takes a number or 'auto', got {replicas!r}")
    if args.threads_per_replica < 1:
        raise CliError("--threads-per-replica must be at least 1")
    return ScaleOut(replicas=replicas if replicas == AUTO else int(replicas), min_replicas=args.min_replicas,
                    max_replicas=args.max_replicas, ray_address=args.ray_address, threads=args.threads_per_replica)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default=argparse.SUPPRESS, help="A1111-style models folder (default ./models)")
    parser.add_argument("--outputs-dir", default=argparse.SUPPRESS, help="where images are saved (default ./outputs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=argparse.SUPPRESS, help="compute device (default auto)")
    from engine.memory import MEMORY_MODES

    for mode in MEMORY_MODES:  # declared once in engine.memory: --cpu-text-encoders, --medvram, --lowvram
        if mode.flag:
            parser.add_argument(mode.flag, action="store_true", default=argparse.SUPPRESS, help=mode.help)
    parser.add_argument("--skip-memory-check", action="store_true", default=argparse.SUPPRESS,
                        help="load a model even when its memory estimate exceeds what is free (it may then run out of memory)")
    parser.add_argument("--vae-tiling", action="store_true", default=argparse.SUPPRESS, help="decode large images in tiles (pixels differ near seams)")
    parser.add_argument("--compile", action="store_true", default=argparse.SUPPRESS, help="torch.compile the UNet (slow first run)")


def extension_commands(extensions) -> dict:
    """Subcommands the loaded extensions add, by name."""
    if extensions is None:
        return {}
    return {name: command for extension in extensions.loaded.values() for name, command in extension.cli_commands.items()}


def _flag_help(declared) -> str:
    text = declared.help or declared.label
    if declared.range is not None and declared.type in (int, float):
        text += f" ({declared.range[0]}..{declared.range[1]}"
        return text + (f", default {declared.default})" if declared.default is not None else ")")
    if declared.default not in (None, "", False) and declared.type is not tuple:
        text += f" (default {declared.default})"
    return text


def _spelling(text: str) -> str:
    """A choice as flags spell it: "Just resize" and "just-resize" both work."""
    return text.strip().lower().replace(" ", "-")


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """One flag per request field that declares one (``engine.fields``), the loaded extensions' included."""
    from engine.family_settings import APPLIED
    from engine.fields import CORE, FIELDS, Names

    parser.add_argument("--prompts-file", help="one generation per line of this file, same settings")
    for declared in FIELDS.with_cli():
        common = {"dest": declared.name, "help": _flag_help(declared)}
        # A setting the model's family chooses is left unset here, and filled in from the model (run_generate).
        default = None if declared.name in APPLIED else declared.default
        if declared.owner != CORE:  # an extension's flag may be repeated; the extension reads the values
            parser.add_argument(declared.cli, action="append", default=[], **common)
        elif declared.type is bool:
            parser.add_argument(declared.cli, action="store_true", **common)
        elif declared.type is Names:  # a flag given once per name
            parser.add_argument(declared.cli, action="append", default=[], **common)
        elif declared.type in (int, float):
            parser.add_argument(declared.cli, type=declared.type, default=default, **common)
        elif (names := declared.cli_choices()) is not None:
            spelled = next((flag for flag, choice in names.items() if choice == declared.default), declared.default)
            if callable(declared.choices):  # sampler and schedule names: aliases in any case, resolved by the request
                parser.add_argument(declared.cli, default=default, **common)
            else:
                parser.add_argument(declared.cli, choices=tuple(names), default=spelled, type=_spelling, **common)
        else:  # text, a file path or outpaint's four numbers
            text_default = declared.default if declared.type is str and declared.name != "prompt" else None
            parser.add_argument(declared.cli, default=text_default, **common)
    parser.add_argument("--xyz", action="append", default=[], metavar="'AXIS: VALUES'",
                        help="an X/Y/Z plot axis, e.g. --xyz 'Steps: 10-30 (+10)' --xyz 'Sampler: Euler, DPM++ 2M': "
                             "the first is X, then Y, then Z; values in A1111's syntax (ranges, quoted commas)")
    parser.add_argument("--xyz-no-legend", action="store_true", help="X/Y/Z plot: draw the grid without its labels")
    parser.add_argument("--xyz-keep-random-seeds", action="store_true",
                        help="X/Y/Z plot: each cell draws its own seed for -1 (A1111's 'Keep -1 for seeds')")
    parser.add_argument("--out", required=True, help="folder for the PNGs")


def studio_config(args: argparse.Namespace):
    from engine.memory import MEMORY_MODES
    from engine.performance import PerformanceOptions
    from engine.studio import StudioConfig

    config = StudioConfig()
    if getattr(args, "models_dir", None):
        config.models_dir = Path(args.models_dir).resolve()
    if getattr(args, "outputs_dir", None):
        config.outputs_dir = Path(args.outputs_dir).resolve()
    if getattr(args, "device", None):
        config.device = args.device
    # The most frugal mode asked for wins (MEMORY_MODES runs from most to least GPU memory).
    chosen = [mode.name for mode in MEMORY_MODES if mode.flag and getattr(args, mode.flag.removeprefix("--").replace("-", "_"), False)]
    config.performance = PerformanceOptions(memory_mode=chosen[-1] if chosen else "normal",
                                            memory_check=not getattr(args, "skip_memory_check", False),
                                            vae_tiling=getattr(args, "vae_tiling", False), compile=getattr(args, "compile", False))
    return config


def load_extensions(argv: list[str]):
    """The extensions the folders given on the command line hold, loaded before parsing: they add flags and commands."""
    from engine.extensions import ExtensionManager

    early = argparse.ArgumentParser(add_help=False)
    add_common(early)
    known, _ = early.parse_known_args(argv)
    config = studio_config(known)
    return ExtensionManager(config.extensions_dir, config.user_dir / "extensions.json", models_dir=config.models_dir,
                            builtin_dir=config.builtin_models_dir)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extensions = load_extensions(argv)
    parser = build_parser(extensions)
    args, extra = parser.parse_known_args(argv)
    command = args.command or "serve"
    if extra and command not in ("test", "bench", "train-demo"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if command in extension_commands(extensions):
            return run_extension_command(extension_commands(extensions)[command], args)
        if command == "test":
            return run_tests(extra)
        if command == "bench":
            return subprocess.call([sys.executable, "-m", "bench", *extra], cwd=ROOT)
        if command == "train-demo":
            return subprocess.call(train_demo_command(extra), cwd=ROOT)
        if command == "generate":
            return run_generate(args)
        return run_server(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def train_demo_command(extra: list[str]) -> list[str]:
    """``train-demo [--flow] ARGS``: the demo model's recipe (``training.demo_model``), or with ``--flow`` the flow demo's
    (``training.demo_flow``), with the other arguments passed on."""
    module = "training.demo_flow" if "--flow" in extra else "training.demo_model"
    return [sys.executable, "-m", module, *(arg for arg in extra if arg != "--flow")]


# pytest's exit status when it collected nothing (a phase whose marker selects none of the paths given).
NO_TESTS_COLLECTED = 5


def pytest_runs(extra: list[str]) -> list[list[str]]:
    """The pytest runs of ``launch.py test``: the tests without a browser spread as whole files over the cores
    (pytest-xdist; each file's fixtures stay in one worker; one torch thread each, so a worker per core is the
    machine's full speed, and past 4 the tiny models each worker builds cost more than they save), then the
    browser tests one at a time. Two browsers at once on two cores made their timing-sensitive tests (skip,
    trash button, gallery layout) flake. A caller who picks ``-n`` or ``-m`` gets exactly one run, as given."""
    paths = extra or ["tests"]
    if any(arg in ("-n", "-m") or arg.startswith(("-n", "--numprocesses", "-m")) for arg in extra):
        return [paths]
    workers = max(1, min(os.cpu_count() or 1, 4))
    spread = ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []
    return [[*spread, "-m", "not browser", *paths], ["-m", "browser", *paths]]


def run_tests(extra: list[str]) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    statuses = [subprocess.call([sys.executable, "-m", "pytest", *arguments], cwd=ROOT, env=env)
                for arguments in pytest_runs(extra)]
    if all(status == NO_TESTS_COLLECTED for status in statuses):
        print("error: pytest collected no tests; that counts as a failure", file=sys.stderr)
        return 1
    failed = [status for status in statuses if status not in (0, NO_TESTS_COLLECTED)]
    return failed[0] if failed else 0


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
            raise CliError(f"{flag_for(error.field)}: {error.message}") from None
    from engine.studio import Studio

    studio = Studio(studio_config(args))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"--out: cannot create {out}: {error.strerror}") from None
    index = len(list(out.glob("*.png")))
    model_settings = settings_not_given(args, studio)  # the model's own, where no flag gave one
    for request in requests:
        request = resolve_extensions(studio, request, args)
        try:
            request = request.with_changes(**model_settings)
            if args.xyz:
                result = plan_xyz(args, request, studio).run(studio.engine)
            else:
                result = studio.engine.generate(request)
        except ValidationError as error:
            raise CliError(f"{flag_for(error.field)}: {error.message}") from None
        except SfumatoError as error:
            raise CliError(str(error)) from None
        for generated in result.images:
            path = unique_path(out, index, generated.seed)
            save_png(generated.image, path, generated.infotext)
            index += 1
            print(f"{path} {generated.seed}", flush=True)
    return 0


def parse_xyz_axis(text: str) -> tuple[str, str]:
    """``--xyz 'Steps: 10,20'`` → ("Steps", "10,20"): the axis is named before the first colon."""
    name, colon, values = text.partition(":")
    if not colon or not name.strip():
        raise CliError(f"--xyz: {text!r} must be 'AXIS: VALUES', e.g. 'Steps: 10,20'")
    return name.strip(), values.strip()


def plan_xyz(args: argparse.Namespace, request, studio=None):
    """The X/Y/Z plot the ``--xyz`` flags describe on this request (its axes checked before anything runs)."""
    from engine import ValidationError
    from engine.xyz import PlotOptions, XyzPlot, find_axis
    from engine.xyz.axes import installed_in

    if len(args.xyz) > 3:
        raise CliError(f"--xyz: a plot has at most three axes (X, Y, Z), got {len(args.xyz)}")
    tab = "txt2img" if request.mode == "txt2img" else "img2img"
    options = PlotOptions(draw_legend=not args.xyz_no_legend, keep_random_seeds=args.xyz_keep_random_seeds)
    try:
        axes = [(find_axis(name, tab), values) for name, values in map(parse_xyz_axis, args.xyz)]
        return XyzPlot.plan(request, axes, options, installed_in(studio.registry) if studio is not None else None)
    except ValidationError as error:
        raise CliError(f"--xyz: {error}") from None


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


def settings_not_given(args: argparse.Namespace, studio) -> dict:
    """The family settings no flag gave, as the model draws best with them (the flow demo's card: Euler, Simple,
    CFG 3; Flux.1 dev: CFG 1, Distilled CFG 3.5), as picking the model in the UI sets them."""
    from engine.family_settings import APPLIED, family_settings
    from ui.model_info import default_model_name, model_family

    missing = [name for name in APPLIED if getattr(args, name, None) is None]
    if args.sampler is not None and "schedule" in missing:  # a sampler given draws with its own schedule (Automatic),
        missing.remove("schedule")                          # or the one its legacy name carries ("DPM++ 2M Karras")
    if not missing:
        return {}
    # An unknown model reads as SD 1.x here; generating with it then says what is wrong with the name.
    chosen = family_settings(model_family(studio, args.model or default_model_name(studio)))
    return {name: chosen[name] for name in missing}


def build_request(args: argparse.Namespace, prompt: str):
    """The request the core flags describe (each converted as its field's declaration says); a family setting no flag
    gave has its declared default until ``settings_not_given`` puts the model's own in."""
    from PIL import Image

    from engine import GenerationRequest
    from engine.family_settings import APPLIED
    from engine.fields import CORE, FIELDS

    values = {}
    for declared in FIELDS.with_cli():
        if declared.owner != CORE or declared.name == "prompt":
            continue
        value = getattr(args, declared.name)
        if value is None and declared.name in APPLIED:
            value = declared.default
        if declared.name == "outpaint":
            value = parse_outpaint(value)
        elif declared.type is Image.Image:
            value = open_image(value, declared.cli) if value else None
        elif declared.type is str and not callable(declared.choices) and (names := declared.cli_choices()):
            value = names.get(value, value)
        values[declared.name] = value
    return GenerationRequest(prompt=prompt, **values)


def resolve_extensions(studio, request, args: argparse.Namespace):
    """Turn each extension field's flags (``--control ...``) into that extension's settings."""
    from engine import ValidationError
    from engine.fields import FIELDS

    settings = dict(request.extensions)
    for declared in FIELDS.owned_by_extensions():
        values = getattr(args, declared.name, None) if declared.cli else None
        if not values:
            continue
        if declared.owner not in studio.extensions.loaded:
            raise CliError(f"{declared.cli}: the {declared.owner} extension is not loaded (see the Extensions tab)")
        try:
            raw = studio.extensions.cli_args(declared.owner, values, studio=studio, model=request.model)
            settings[declared.owner] = studio.extensions.validate(declared.owner, raw)
        except ValidationError as error:
            raise CliError(f"{declared.cli}: {error.message}") from None
    return request.with_changes(extensions=settings)


def run_extension_command(command, args: argparse.Namespace) -> int:
    from engine import SfumatoError

    try:
        return command.run(args, studio_config(args))
    except SfumatoError as error:
        raise CliError(str(error)) from None


# -- serve ----------------------------------------------------------------------
def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, ``kill``) stops the server the way Ctrl+C does, so the replicas and the
    Ray this process started are shut down too rather than left running."""
    import signal

    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


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
    scale = scale_out(args)
    studio = Studio(studio_config(args))
    replicas = None
    if scale is not None:
        from engine.replicas import start_replicas

        try:
            replicas = start_replicas(studio, scale)
        except ValueError as error:
            raise CliError(str(error)) from None
        print(f"Jobs run on {replicas.count} engine replica(s) on Ray Serve", flush=True)
        _stop_on_sigterm()
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
    finally:
        if replicas is not None:
            from engine.replicas import stop_replicas

            stop_replicas(replicas)
    return 0
