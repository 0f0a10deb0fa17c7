"""Sfumato's demo-model training: a procedural world, a pixel evaluator and the training script.

Run ``python -m training.demo_model`` to train the built-in tiny Stable Diffusion
(``builtin/sfumato-demo``) and its outline ControlNet from scratch on the CPU.
"""
