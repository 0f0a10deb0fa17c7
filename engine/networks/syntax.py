"""``<lora:name:…>`` tags in a prompt, read as A1111 reads them.

A1111's extra-network syntax (``modules/extra_networks.py`` and the built-in Lora extension, 1.10):
a tag is ``<kind:arg:arg…>``; the first argument is the network's name, the second the text-encoder
multiplier (default 1), the third the UNet multiplier (default: the text-encoder one); ``te=`` and
``unet=`` set them by name. ``lyco`` is the LyCORIS extension's spelling of the same tag. Tags are
taken out of the text that is encoded; the prompt written in the infotext keeps them. Only the
positive prompt is read, as A1111 does: a tag in the negative prompt stays text.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ValidationError

NETWORK_KINDS = ("lora", "lyco")
_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkUse:
    """One tag: which network, as the prompt names it, and its two multipliers."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0

    @property
    def silent(self) -> bool:
        """Both multipliers 0: the network changes nothing, so it is not applied at all (bit-identical to no tag)."""
        return self.te_weight == 0 and self.unet_weight == 0


@dataclass(frozen=True)
class ParsedPrompt:
    """The prompt to encode (tags removed) and the networks its tags ask for, in order."""

    text: str
    uses: tuple[NetworkUse, ...]


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValidationError("prompt", f"{tag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValidationError("prompt", f"{tag}: the multiplier must be a finite number, not {text!r}")
    return value


def _use(args: str, tag: str) -> NetworkUse:
    positional, named = [], {}
    for arg in args.split(":"):
        key, equals, value = arg.partition("=")
        if equals:  # A1111: any key=value argument is a named one (te, unet; others, like dyn, change nothing here)
            named[key.strip()] = value.strip()
        else:
            positional.append(arg.strip())
    name = positional[0] if positional else ""
    if not name:
        raise ValidationError("prompt", f"{tag} names no network")
    te = _number(positional[1], tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], tag) if "te" in named else te
    unet = _number(positional[2], tag) if len(positional) > 2 else te
    unet = _number(named["unet"], tag) if "unet" in named else unet
    return NetworkUse(name=name, te_weight=te, unet_weight=unet)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The prompt without its ``<lora:…>`` / ``<lyco:…>`` tags, and the networks they name.

    Tags of other kinds (``<hypernet:…>``, an extension's) are left in the text, as A1111 leaves a tag
    no extra network claims.
    """
    uses: list[NetworkUse] = []

    def take(match: re.Match) -> str:
        if match[1] not in NETWORK_KINDS:
            return match[0]
        uses.append(_use(match[2], match[0]))
        return ""

    text = _TAG.sub(take, prompt)
    return ParsedPrompt(text=text, uses=tuple(uses))
