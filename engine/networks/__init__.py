"""Extra networks: the small files A1111 users add to a checkpoint (LoRAs, textual-inversion embeddings, VAEs).

- ``library``: finding files in ``models/Lora``, ``models/LyCORIS`` and ``builtin/loras``, A1111's names and short hashes;
- ``syntax``: ``<lora:name:te:unet>`` tags in a prompt;
- ``formats``: what a file holds (kohya LoRA/LoCon, diffusers/PEFT, LyCORIS LoHa/LoKr) and refusing the rest;
- ``job``: one job's tags resolved to files, with the prompt to encode and the infotext entry;
- ``layer_names``: kohya's layer names resolved against the loaded model's modules;
- ``lycoris``: LoHa and LoKr through peft's layers;
- ``apply``: the networks on the model for one job, and off again after it;
- ``embeddings``: textual-inversion files in ``models/embeddings``;
- ``vae_files``: VAE files in ``models/VAE``, picked per job;
- ``cards``: the extra-networks browser's cards (previews, A1111 sidecars, kohya's training notes).

The engine calls ``prepare(library, prompt)`` and runs the job inside ``active(model, job)``.
"""
from .apply import active
from .formats import NetworkError, NetworkWeights, detect_format, read_network
from .job import JobNetwork, JobNetworks, prepare
from .library import BUILTIN_NETWORKS_SUBDIR, NETWORK_FOLDERS, NetworkFile, NetworkLibrary, addnet_hash, read_metadata
from .syntax import NetworkUse, ParsedPrompt, parse_prompt

__all__ = ["BUILTIN_NETWORKS_SUBDIR", "NETWORK_FOLDERS", "JobNetwork", "JobNetworks", "NetworkError", "NetworkFile", "NetworkLibrary",
           "NetworkUse", "NetworkWeights", "ParsedPrompt", "active", "addnet_hash", "detect_format", "parse_prompt", "prepare",
           "read_metadata", "read_network"]
