"""The networks one job asks for: its prompt's tags, resolved to files, read and hashed.

Everything that can fail on the artist's input (an unknown name, a bad multiplier, an unreadable
file) fails here, before anything touches the model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .formats import NetworkError, NetworkWeights, read_network
from .library import NetworkFile, NetworkLibrary
from .syntax import NetworkUse, parse_prompt


@dataclass(frozen=True)
class JobNetwork:
    file: NetworkFile
    use: NetworkUse
    weights: NetworkWeights
    short_hash: str
    identity: tuple  # the file's version as it was read (``NetworkFile.identity``)


@dataclass(frozen=True)
class JobNetworks:
    """The prompt to encode (tags removed) and the networks to apply while the job runs."""

    prompt: str
    networks: tuple[JobNetwork, ...] = ()

    @property
    def applied(self) -> tuple[JobNetwork, ...]:
        """Networks that change anything: a tag whose multipliers are both 0 is not applied at all."""
        return tuple(network for network in self.networks if not network.use.silent)

    @property
    def text_encoder_key(self) -> tuple:
        """What the text encoders carry in this job, for the prompt-embedding cache's keys."""
        return tuple((network.identity, network.use.te_weight) for network in self.applied if network.use.te_weight != 0)

    def infotext_fields(self) -> dict[str, str]:
        """A1111's ``Lora hashes`` entry: each network as the prompt names it, with its short hash."""
        # Imported here: the infotext module reads requests, which read prompts, which read embeddings from this package.
        from ..infotext import LORA_HASHES_KEY, format_name_hashes

        if not self.networks:
            return {}
        return {LORA_HASHES_KEY: format_name_hashes({network.use.name: network.short_hash for network in self.networks})}


def prepare(library: NetworkLibrary, prompt: str) -> JobNetworks:
    """The prompt's ``<lora:…>`` tags resolved: ``ValidationError`` on ``prompt`` for an unknown name or a bad
    multiplier, ``NetworkError`` for a file that cannot be read."""
    parsed = parse_prompt(prompt)
    networks = []
    for use in parsed.uses:
        file = library.get(use.name)
        try:
            identity = file.identity
            short_hash = library.short_hash(file)
        except OSError as error:
            raise NetworkError(f"LoRA file {file.path.name} cannot be read ({error.strerror or error}); refresh the LoRA list") from error
        networks.append(JobNetwork(file=file, use=use, weights=read_network(file.path, identity), short_hash=short_hash,
                                   identity=identity))
    return JobNetworks(prompt=parsed.text, networks=tuple(networks))
