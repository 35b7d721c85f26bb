"""Models from and to the Hugging Face Hub, without the network: downloads read a Hub cache laid
out here (HF_HUB_OFFLINE=1), uploads go to a mocked `HfApi`."""
import json

import huggingface_hub
import pytest
import torch

from mmcap import Captioner
from mmcap.cli import main as mmcap_main
from mmcap.model.hub import MODEL_FILES, TOKENIZER_FILES, is_repo_id

MAIN, TAGGED = "a" * 40, "b" * 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub_cache(tiny_gpt2, tmp_path, monkeypatch):
    """`org/tiny` in a Hub cache: main holds the model, tag v1 (commit TAGGED) the same weights with
    beam-3 generation defaults."""
    repo = tmp_path / "hub" / "models--org--tiny"
    tiny_gpt2.save_pretrained(repo / "snapshots" / MAIN)
    tiny_gpt2.generation_config = tiny_gpt2.generation_config.updated(num_beams=3)
    tiny_gpt2.save_pretrained(repo / "snapshots" / TAGGED)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def test_from_pretrained_takes_a_repo_id_offline(hub_cache, tiny_gpt2, image_files, capsys):
    model = Captioner.from_pretrained("org/tiny")
    assert model.generation_config.num_beams == 1
    pixels = torch.randn(2, 3, 64, 64)
    assert model.caption(pixels, max_new_tokens=4) == tiny_gpt2.caption(pixels, max_new_tokens=4)
    assert Captioner.from_pretrained("org/tiny", revision="v1").generation_config.num_beams == 3
    assert Captioner.from_pretrained("org/tiny", revision=TAGGED).generation_config.num_beams == 3
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        Captioner.from_pretrained("org/absent")
    # the command line takes the same names
    assert mmcap_main(["caption", "--model", "org/tiny", "--revision", "v1", "--max-new-tokens", "3",
                       "--num-workers", "0", str(image_files[0])]) == 0
    assert capsys.readouterr().out.startswith(str(image_files[0]) + "\t")


def test_download_asks_only_for_model_and_tokenizer_files(hub_cache, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(hub_cache / "snapshots" / MAIN)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    Captioner.from_pretrained("org/tiny", revision="v1")
    (repo_id, kwargs), = calls
    assert repo_id == "org/tiny" and kwargs["revision"] == "v1" and kwargs["local_files_only"] is False
    assert set(kwargs["allow_patterns"]) == set(MODEL_FILES) | set(TOKENIZER_FILES)
    assert not any("*" in p for p in kwargs["allow_patterns"])  # no pickles, no code, nothing else


def test_local_paths_are_never_repo_ids():
    assert is_repo_id("org/name") and is_repo_id("gpt2") and is_repo_id("org/name-v1.2")
    for path in ("runs/demo/model", "./model", "/abs/model", "~/model", "../up", "org/../x"):
        assert not is_repo_id(path), path


def test_push_to_hub_uploads_the_model_files_and_a_card(tiny_gpt2, monkeypatch):
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["created"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        sent["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        sent["upload"] = (repo_id, kwargs)
        return "https://huggingface.co/org/tiny/commit/123"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = tiny_gpt2.push_to_hub("org/tiny", private=True, datasets=["coco"], metrics={"CIDEr": 1.0512, "images": 5000})
    assert url.endswith("/commit/123")
    assert sent["created"] == ("org/tiny", {"private": True, "exist_ok": True})
    assert set(sent["files"]) == {"README.md", *MODEL_FILES, "tokenizer.json", "tokenizer_config.json"}
    assert json.loads(sent["files"]["config.json"])["encoder"]["arch"] == "resnet18"
    card = sent["files"]["README.md"].decode()
    assert card.startswith("---\nlibrary_name: mmcap\npipeline_tag: image-to-text\n")
    assert "datasets:\n- coco\n" in card and "| CIDEr | 1.0512 |" in card and "| images | 5000 |" in card
    assert "torchvision resnet18" in card and "2 layers, width 32" in card
    assert 'Captioner.from_pretrained("org/tiny")' in card and "mmcap caption --model org/tiny" in card
