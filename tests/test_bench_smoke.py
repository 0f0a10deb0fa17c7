"""Every bench runs in smoke mode (tiny models, one repetition) so none of them rots.

The figures themselves are not asserted against their goals here (CI machines
are noisy); what is pinned is that each bench runs, reports the figures the
JSON promises, and, where a figure is exact, that it holds: the engine's
pixels equal the diffusers pipeline's, a repeated prompt hits the cache, a
cached model re-selects far faster than a cold load. The server benches skip
while the server modules are missing.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from bench import caching, first_preview, hires, limit, networks, peer, previews, scaling, upscaling
from bench.fixtures import BenchContext, BenchModels, quiet_libraries
from bench.report import README_END, README_START, BenchResult, Row, write_readme
from bench.server import unavailable_reason
from bench.timing import MODES, interleave

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(600)
SMOKE = MODES["smoke"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    quiet_libraries()
    models = BenchModels.create(SMOKE, device="cpu", models_dir=tmp_path_factory.mktemp("bench-models"))
    context = BenchContext(SMOKE, models, models.engine(), tmp_path_factory.mktemp("bench-out"), log=lambda _line: None, threads=1)
    yield context
    models.close()


def test_smoke_mode_uses_tiny_models_only(ctx):
    assert ctx.models.sd1 == "tiny-sd1" and ctx.models.sdxl == "tiny-sdxl"


def test_engine_draws_diffusers_picture_within_a_few_levels_and_reports_both_prompt_ratios(ctx):
    """Both run DPM-Solver++(2M) over the same Karras σs; diffusers rounds the model's timesteps to integers and
    takes a first-order last step, A1111 (and the engine) do neither, so the pictures agree closely, not exactly."""
    result = peer.run(ctx)
    assert result.skipped is None
    for family in ("sd1", "sdxl"):
        figures = result.figures[family]
        assert figures["cold_prompt"] > 0 and figures["warm_prompt"] > 0
        assert figures["max_pixel_diff"] <= 4, f"{family}: engine and diffusers disagree at the same seed"


def test_compute_floor_bench_reports_ratio_and_step_time(ctx):
    result = limit.run(ctx)
    for family in ("sd1", "sdxl"):
        figures = result.figures[family]
        assert figures["ratio"] > 0 and figures["unet_call_ms"] > 0 and figures["decode_ms"] > 0
    assert result.figures["sd1"]["step_ms"] > 0


def test_preview_bench_previews_every_step_only_when_asked(ctx):
    result = previews.run(ctx)
    counts = result.figures["previews_per_image"]
    assert counts["off"] == 0
    assert counts["cheap"] == SMOKE.steps and counts["full"] == SMOKE.steps
    assert result.figures["cheap"] > 0 and result.figures["full"] > 0


def test_cache_bench_sees_prompt_hits_and_fast_model_reselect(ctx):
    result = caching.run(ctx)
    prompt = result.figures["repeat_prompt"]
    assert prompt["encoder_hits"] >= SMOKE.repetitions, "the repeated prompt must come from the cache"
    assert prompt["encoder_misses"] >= SMOKE.repetitions + 1
    switch = result.figures["model_switch"]
    assert switch["cached_ms"] < switch["cold_load_ms"] / 2


def test_lora_switch_bench_switches_without_reloading_the_model(ctx):
    figures = networks.run(ctx).figures["lora_switch"]
    assert figures["model_reloaded"] is False
    assert figures["switching_ms"] > 0 and figures["on_off_ms"] > 0 and figures["read_file_ms"] > 0


def test_scaling_bench_measures_sizes_batches_memory_and_plots(ctx):
    result = scaling.run(ctx)
    figures = result.figures
    assert [point["size"] for point in figures["sizes"]][0] == 64
    assert [point["batch"] for point in figures["batches"]] == list(SMOKE.scaling_batches)
    assert all(point["step_ms"] > 0 and point["peak_rss_mb"] > 0 for point in figures["sizes"] + figures["batches"])
    assert figures["process_peak_rss_mb"] > 0
    assert (ctx.out_dir / "scaling.png").stat().st_size > 0


def test_upscaling_bench_measures_tiled_and_whole_peaks(ctx):
    figures = upscaling.run(ctx).figures
    # Peak RSS moves in pages the allocator may already hold: at this size either run can add nothing measurable.
    assert figures["side"] == 256 and figures["whole_extra_mb"] >= 0 and figures["tiled_extra_mb"] >= 0
    assert figures["max_difference_255"] < 2  # the same picture, tile seams blended


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason("ui", "api", "client") is not None, reason=str(unavailable_reason("ui", "api", "client")))
def test_first_preview_bench_reaches_a_preview_through_ui_and_api(ctx):
    result = first_preview.run(ctx)
    assert result.skipped is None
    for door in ("gradio", "browser", "http"):
        assert result.figures[door]["median_ms"] > 0, result.figures[door]
    assert result.figures["step_ms"] > 0


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason("api") is not None, reason=str(unavailable_reason("api")))
def test_load_script_finds_no_lost_misrouted_or_duplicated_jobs(tmp_path):
    from bench import load

    out = tmp_path / "load.json"
    status = load.main(["--clients", "2", "--jobs", "2", "--steps", "1", "--timeout", "300", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["jobs"] == 4 and report["answered"] == 4
    assert report["lost"] == report["misrouted"] == report["duplicated"] == 0
    assert status == 0


def test_cli_writes_the_headline_keys(tmp_path):
    from bench.cli import main

    out = tmp_path / "latest.json"
    assert main(["--smoke", "--only", "limit,previews", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    for key in ("engine_vs_diffusers", "engine_vs_limit", "preview_cost", "first_preview_ms", "step_ms", "peak_rss_mb"):
        assert key in document
    assert document["engine_vs_limit"] > 0 and document["step_ms"] > 0 and document["peak_rss_mb"] > 0
    assert document["preview_cost"]["cheap"] > 0
    assert document["meta"]["mode"] == "smoke"


def test_readme_section_is_replaced_between_markers_and_prose_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nHow to run.\n\n{README_START}\nold table\n{README_END}\n\nMore prose.\n")
    results = [BenchResult("x", "x", rows=[Row("engine ÷ diffusers", 0.9, "×", 0.95)])]
    write_readme(readme, results, {"mode": "smoke"})
    text = readme.read_text()
    assert "old table" not in text and "How to run." in text and "More prose." in text
    assert "| engine ÷ diffusers | 0.900× | ≤ 0.950× | pass |" in text


def test_interleave_rotates_the_order_every_round():
    order: list[str] = []
    runners = {name: (lambda index, name=name: order.append(name) or 1.0) for name in "abc"}
    times = interleave(runners, repetitions=3, warmup=0)
    assert order == list("abc" "bca" "cab")
    assert all(len(values) == 3 for values in times.values())


def test_interleave_adds_rounds_within_the_budget_and_stops_at_the_cap(monkeypatch):
    from bench import timing

    now = [0.0]
    monkeypatch.setattr(timing, "clock", lambda: now[0])

    def runner(index: int) -> float:
        now[0] += 1.0  # every run "takes" one second
        return 1.0

    times = interleave({"a": runner, "b": runner}, repetitions=3, warmup=1, budget_s=10.0)
    assert len(times["a"]) == len(times["b"]) == 5  # 3 required rounds, then rounds until 10 s were spent
    assert len(interleave({"a": runner}, repetitions=2, budget_s=0.0)["a"]) == 2
    monkeypatch.setattr(timing, "MAX_ROUNDS", 7)
    assert len(interleave({"a": runner}, repetitions=2, budget_s=1e9)["a"]) == 7


def test_scaling_runs_full_points_then_short_ones_up_to_the_largest_size_that_fits(monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    from bench import scaling
    from bench.timing import MODES

    def fake_point(ctx, model_name, size, batch, short=False):  # 1 ms per step at 64², growing with the pixels
        steps = scaling.SHORT_POINT_STEPS if short else ctx.mode.steps
        step_ms = (size / 64) ** 2
        return {"size": size, "batch": batch, "step_ms": step_ms, "total_ms": step_ms * steps, "steps": steps,
                "short": short, "job_rss_delta_mb": (size / 64) ** 2, "step_ms_per_image": step_ms / batch}

    monkeypatch.setattr(scaling, "point", fake_point)
    mode = replace(MODES["full"], steps=20, scaling_sizes=(64, 128, 256, 512, 1024, 2048), scaling_batches=(1,),
                   scaling_budget_s=0.5, scaling_short_budget_s=0.5)
    ctx = SimpleNamespace(mode=mode, log=lambda line: None,
                          models=SimpleNamespace(registry=SimpleNamespace(load=lambda name: SimpleNamespace(
                              family=SimpleNamespace(max_size=4096)))))
    sizes = scaling.measure(ctx, "m")["sizes"]
    # 256²: 16 ms × 20 steps fits 0.5 s; 512²: 64 ms × 20 does not, × 3 does; 1024²: 256 ms × 3 does not
    assert [(p["size"], p["short"]) for p in sizes] == [(64, False), (128, False), (256, False), (512, True)]
    monkeypatch.setattr(scaling, "available_mb", lambda: 100.0)  # 512² would need 64 MiB, over half of 100
    assert [p["size"] for p in scaling.measure(ctx, "m")["sizes"]] == [64, 128, 256]


def test_hires_bench_reports_the_second_pass_as_a_ratio_of_the_first(ctx):
    figures = hires.run(ctx).figures["hires_fix"]
    # one noisy repetition in smoke mode: the figures are reported, not judged
    assert figures["pairs"] >= 1 and figures["hires_ms"] > 0 and figures["plain_ms"] > 0
    assert isinstance(figures["second_pass_ratio"], float)


def test_only_lists_every_bench_in_the_order_they_run():
    from bench import cli

    assert tuple(cli._benches()) == cli.BENCH_NAMES


def test_speed_bench_reports_each_target_with_a_verdict_and_exact_traced_pixels(tmp_path, capsys):
    """``python -m bench speed --quick``: the 64² ratio against diffusers, the per-step overhead and the levers, with the
    traced call's pixels equal to the eager call's (its exactness, the one figure asserted)."""
    from bench import speed

    out = tmp_path / "speed.json"
    assert speed.main(["--quick", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    (row,) = document["vs_diffusers"]
    assert row["size"] == 64 and row["ratio"] > 0 and row["max_pixel_diff"] is not None
    (overhead,) = document["step_overhead"]
    assert 0 < overhead["model_call_ms"] < overhead["step_ms"] and 0 < overhead["own_work_ms"] < overhead["step_ms"]
    traced = next(lever for lever in document["levers"] if lever["lever"] == "traced model call")
    assert traced["max_pixel_diff"] == 0 and traced["traces_made"] >= 1
    printed = capsys.readouterr().out
    assert ("PASS" in printed or "FAIL" in printed) and "Per-step overhead" in printed


def test_gpu_bench_says_plainly_that_nothing_was_measured_without_cuda(capsys):
    from bench import gpu

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the GPU bench would measure")
    assert gpu.main([]) == 0
    assert "UNMEASURED" in capsys.readouterr().out


def test_the_gpu_bench_measures_both_sides_the_same_way_on_any_device(capsys):
    """Its measuring code, run on the CPU with a tiny model: a CUDA machine's first run should not be its first test."""
    from bench import gpu
    from engine.tiny_models import build_sd1

    (row,), modes = gpu.run_points([("tiny-sd1", 64, lambda folder: build_sd1(folder, seed=0))], "cpu", steps=2, pairs=1)
    assert row["sfumato_it_s"] > 0 and row["diffusers_it_s"] > 0 and row["ratio"] > 0
    assert row["sfumato_peak_vram_mb"] is None  # the CPU keeps no count
    assert [mode["memory_mode"] for mode in modes] == ["cpu-text-encoders", "medvram", "lowvram"]
    assert all(mode["sfumato_it_s"] > 0 for mode in modes)
    assert all("it/s" in gpu.describe(line) and "VRAM" not in gpu.describe(line) for line in (row, *modes))
