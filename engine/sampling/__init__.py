"""Sampling: a denoiser D(x, σ) → x̂₀, samplers as plain functions over a σ sequence, schedules as functions.

``types`` holds the contract every piece shares. ``diffusers_loop`` is the old loop over diffusers
scheduler classes, kept only until the σ-based pass replaces it.
"""
from .diffusers_loop import DenoiseJob, InpaintInputs, StepHook, denoise

__all__ = ["DenoiseJob", "InpaintInputs", "StepHook", "denoise"]
