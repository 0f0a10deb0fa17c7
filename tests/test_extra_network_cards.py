"""The extra-networks browser's cards: previews and sidecars found where A1111 users keep them, kohya's training
notes read from the header alone, the filters, and a damaged file shown with a reason instead of breaking the list."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.networks import NetworkLibrary
from engine.networks import cards as C
from engine.networks.embeddings import EmbeddingLibrary

torch.set_num_threads(1)


def _lora(path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(path), metadata=metadata)
    return path


def _picture(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _card(models: Path, name: str) -> C.Card:
    return next(card for card in C.lora_cards(NetworkLibrary(models)) if card.name == name)


def test_a_preview_is_found_under_either_of_a1111s_names(tmp_path):
    plain = _lora(tmp_path / "Lora" / "plain.safetensors")
    dotted = _lora(tmp_path / "Lora" / "dotted.safetensors")
    bare = _lora(tmp_path / "Lora" / "bare.safetensors")
    _picture(tmp_path / "Lora" / "plain.png")
    _picture(tmp_path / "Lora" / "dotted.preview.jpg")
    assert C.find_preview(plain) == tmp_path / "Lora" / "plain.png"
    assert C.find_preview(dotted) == tmp_path / "Lora" / "dotted.preview.jpg"
    assert C.find_preview(bare) is None
    assert _card(tmp_path, "dotted").preview == tmp_path / "Lora" / "dotted.preview.jpg"
    # a diffusers folder's picture lies beside the folder
    folder = tmp_path / "Stable-diffusion" / "my-model"
    folder.mkdir(parents=True)
    _picture(tmp_path / "Stable-diffusion" / "my-model.preview.png")
    assert C.find_preview(folder) == tmp_path / "Stable-diffusion" / "my-model.preview.png"


def test_kohya_training_notes_give_the_base_model_and_the_most_frequent_tags(tmp_path):
    frequency = {"10_alice": {"alice": 12, " red dress": 3, "smile": 1}, "5_style": {"red dress": 7, "outdoors": 2, "smile": 4}}
    _lora(tmp_path / "Lora" / "alice.safetensors", {"ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5.ckpt",
                                                     "ss_tag_frequency": json.dumps(frequency), "ss_output_name": "alice"})
    _lora(tmp_path / "Lora" / "bob.safetensors", {"ss_sd_model_name": "animefull-final.ckpt"})
    alice = _card(tmp_path, "alice")
    assert alice.base_model == "sd_v1"
    # summed over both datasets: alice 12, red dress 3+7=10, smile 1+4=5, outdoors 2
    assert alice.trigger_words == ("alice", "red dress", "smile", "outdoors")
    assert alice.problem is None
    assert _card(tmp_path, "bob").base_model == "animefull-final.ckpt"
    assert _card(tmp_path, "bob").trigger_words == ()


def test_training_notes_are_read_from_the_header_without_the_tensors(tmp_path, monkeypatch):
    path = _lora(tmp_path / "Lora" / "alice.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("the tensors were loaded"))
    assert C.training_notes(path).base_model == "sdxl_base_v1-0"


def test_the_sidecar_round_trips_in_a1111s_format_and_keeps_keys_it_does_not_know(tmp_path):
    path = _lora(tmp_path / "Lora" / "alice.safetensors")
    written_by_a1111 = {"description": "a test", "sd version": "SD1", "activation text": "alice, red dress",
                        "preferred weight": 0.7, "negative text": "blurry", "notes": "", "extension key": [1, 2]}
    (tmp_path / "Lora" / "alice.json").write_text(json.dumps(written_by_a1111))
    card = _card(tmp_path, "alice")
    assert card.prompt_text == "<lora:alice:0.7> alice, red dress"
    assert card.negative_text == "blurry"

    C.write_sidecar(path, C.edited(card.sidecar, 0.55, "  alice  ", "trained on 40 pictures"))
    saved = json.loads((tmp_path / "Lora" / "alice.json").read_text())
    assert saved == {"description": "a test", "sd version": "SD1", "activation text": "alice", "preferred weight": 0.55,
                     "negative text": "blurry", "notes": "trained on 40 pictures", "extension key": [1, 2]}
    assert _card(tmp_path, "alice").prompt_text == "<lora:alice:0.55> alice"
    assert [p.name for p in (tmp_path / "Lora").iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_without_a_sidecar_or_with_weight_0_the_default_weight_1_is_inserted(tmp_path):
    path = _lora(tmp_path / "Lora" / "plain.safetensors")
    assert _card(tmp_path, "plain").prompt_text == "<lora:plain:1>"
    C.write_sidecar(path, C.edited(C.Sidecar(), 0, "", ""))
    assert json.loads(C.sidecar_path(path).read_text())["preferred weight"] == 0
    assert _card(tmp_path, "plain").prompt_text == "<lora:plain:1>"
    (tmp_path / "Lora" / "plain.json").write_text("[not, an, object")
    assert _card(tmp_path, "plain").sidecar == C.Sidecar()


def test_search_and_folder_filter(tmp_path):
    _lora(tmp_path / "Lora" / "characters" / "alice.safetensors",
          {"ss_tag_frequency": json.dumps({"d": {"blue hair": 3}})})
    _lora(tmp_path / "Lora" / "characters" / "anime" / "bob.safetensors")
    _lora(tmp_path / "Lora" / "detail.safetensors")
    _lora(tmp_path / "LyCORIS" / "painterly.safetensors")
    cards = C.lora_cards(NetworkLibrary(tmp_path))
    names = lambda chosen: sorted(card.name for card in chosen)  # noqa: E731

    assert C.folders(cards) == ["All", "Lora", "Lora/characters", "Lora/characters/anime", "LyCORIS"]
    assert names(C.filter_cards(cards)) == ["alice", "bob", "detail", "painterly"]
    assert names(C.filter_cards(cards, folder="Lora/characters")) == ["alice", "bob"]
    assert names(C.filter_cards(cards, folder="Lora/characters/anime")) == ["bob"]
    assert names(C.filter_cards(cards, folder="LyCORIS")) == ["painterly"]
    assert names(C.filter_cards(cards, search="BLUE")) == ["alice"]  # a trigger word, any case
    assert names(C.filter_cards(cards, search="characters b")) == ["alice", "bob"]  # every word, anywhere
    assert names(C.filter_cards(cards, search="detail", folder="LyCORIS")) == []


def test_damaged_files_get_a_card_that_says_why(tmp_path):
    good = _lora(tmp_path / "Lora" / "good.safetensors")
    (tmp_path / "Lora" / "tiny.safetensors").write_bytes(b"\x01\x02")
    (tmp_path / "Lora" / "garbage.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 64)
    (tmp_path / "Lora" / "html.safetensors").write_bytes(b"<!DOCTYPE html><html>Not found</html>")
    truncated = tmp_path / "Lora" / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])  # an interrupted download: the header is whole, the tensors are not

    cards = {card.name: card for card in C.lora_cards(NetworkLibrary(tmp_path))}
    assert sorted(cards) == ["garbage", "good", "html", "tiny", "truncated"]
    assert cards["good"].problem is None
    assert "too short" in cards["tiny"].problem
    assert "not JSON" in cards["garbage"].problem
    assert "not a safetensors file" in cards["html"].problem
    assert "truncated" in cards["truncated"].problem
    from ui.extra_networks import grid_html

    page = grid_html(list(cards.values()), C.LORA)
    assert page.count('class="sfumato-card"') == 5 and "truncated: its tensors need" in page


def test_card_html_escapes_names_and_texts(tmp_path):
    path = _lora(tmp_path / "Lora" / "x.safetensors")
    C.write_sidecar(path, C.edited(C.Sidecar(), 1, '"><script>alert(1)</script>', ""))
    from ui.extra_networks import card_html

    page = card_html(_card(tmp_path, "x"))
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_embedding_cards_insert_the_name(tmp_path):
    folder = tmp_path / "embeddings" / "negative"
    folder.mkdir(parents=True)
    save_file({"emb_params": torch.zeros(2, 8)}, str(folder / "bad-hands.safetensors"))
    (tmp_path / "embeddings" / "broken.safetensors").write_bytes(b"\0" * 3)
    _picture(folder / "bad-hands.preview.png")
    cards = {card.name: card for card in C.embedding_cards(EmbeddingLibrary(tmp_path / "embeddings"))}
    assert cards["bad-hands"].prompt_text == "bad-hands"
    assert cards["bad-hands"].folder == "embeddings/negative"
    assert cards["bad-hands"].preview == folder / "bad-hands.preview.png"
    assert cards["bad-hands"].problem is None and "too short" in cards["broken"].problem


def test_png_info_names_the_loras_missing_here_or_with_other_contents(tmp_path):
    """Sending an infotext lists each "Lora hashes" entry this studio cannot reproduce, with A1111's hash worked
    out here from the format (SHA-256 of the bytes after the safetensors header, 12 digits)."""
    import hashlib
    from types import SimpleNamespace

    from engine.networks.vae_files import VaeLibrary
    from ui.send_to import network_notes

    same = _lora(tmp_path / "Lora" / "same.safetensors")
    _lora(tmp_path / "Lora" / "changed.safetensors")
    data = same.read_bytes()
    right = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]
    studio = SimpleNamespace(engine=SimpleNamespace(networks=NetworkLibrary(tmp_path)),
                             registry=SimpleNamespace(embeddings=EmbeddingLibrary(None), vaes=VaeLibrary(None)))
    text = ("a <lora:same:1> <lora:changed:1> <lora:gone:1>\n"
            f'Steps: 2, Seed: 1, Lora hashes: "same: {right}, changed: 0123456789ab, gone: {right}"')
    notes = network_notes(studio, text)
    assert len(notes) == 2
    assert "changed" in notes[0] and "0123456789ab" in notes[0] and "not the file the picture used" in notes[0]
    assert "gone" in notes[1] and "not in models/Lora or models/LyCORIS" in notes[1]
    assert network_notes(studio, f'a\nSteps: 2, Seed: 1, Lora hashes: "same: {right}"') == []
