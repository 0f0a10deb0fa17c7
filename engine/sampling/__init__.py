"""Sampling: a denoiser D(x, σ) → x̂₀, samplers as plain functions over a σ sequence, schedules as functions.

``types`` holds the contract every piece shares; ``table`` says which function, schedule and noise each sampler
uses; ``sample_pass`` runs one pass of a sampler for the engine; ``denoiser`` hides the model's parameterization.
Import the modules themselves: this package imports nothing eagerly, so the request can read the table
without loading torch-heavy code.
"""
