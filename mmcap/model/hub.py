"""Models on the Hugging Face Hub: `model_dir` resolves a repo id to a local snapshot holding only
the files `Captioner.from_pretrained` reads; `push` uploads a model with a generated model card.

Downloads honour `HF_HUB_OFFLINE` (read when called, so setting it after import works too): the
snapshot then comes from the Hub cache (`HF_HUB_CACHE`) or the call fails naming the repo.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# `name` or `org/name`: letters, digits, `-`, `_`, `.`; a local path has more slashes or starts with `.`/`/`/`~`
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(".")


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return value.upper() in ("1", "ON", "YES", "TRUE")


def model_dir(name: Union[str, os.PathLike], revision: Optional[str] = None) -> Path:
    """`name` itself when it is a directory, else the local snapshot of Hub repo `name` at
    `revision` (a branch, tag or commit; default main), downloading only the model files."""
    if Path(name).is_dir() or not is_repo_id(str(name)):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos only, and {name} is a local path")
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=[*MODEL_FILES, *TOKENIZER_FILES],
                                      local_files_only=offline()))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError) as e:
        where = "the Hub cache (HF_HUB_OFFLINE is set)" if offline() else "the Hub"
        raise FileNotFoundError(f"{name} is not a local directory, and {where} has no model {name!r}"
                                f"{f' at revision {revision!r}' if revision else ''}: {e}") from None


def push(captioner, repo_id: str, *, revision: Optional[str] = None, private: Optional[bool] = None,
         token: Optional[str] = None, commit_message: str = "Upload mmcap model",
         datasets: Sequence[str] = (), metrics: Optional[dict] = None) -> str:
    """Upload `captioner` (the `save_pretrained` files and a README.md model card) to `repo_id`,
    creating the repo if needed; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmcap-push-") as tmp:
        captioner.save_pretrained(tmp)
        Path(tmp, "README.md").write_text(model_card(captioner, repo_id, datasets=datasets, metrics=metrics))
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(commit)


def model_card(captioner, repo_id: str, datasets: Sequence[str] = (), metrics: Optional[dict] = None) -> str:
    """A README.md for the Hub: metadata, architecture, training data and metrics where known, usage."""
    cfg = captioner.config
    enc, dec = cfg.encoder, cfg.decoder
    hf = captioner.decoder.config
    params = sum(p.numel() for p in captioner.parameters())
    front = ["---", "library_name: mmcap", "pipeline_tag: image-to-text", "tags:", "- image-captioning", "- mmcap"]
    if datasets:
        front += ["datasets:", *[f"- {d}" for d in datasets]]
    front.append("---")
    decoder = f"{dec.family.upper() if dec.family == 'bert' else 'GPT-2'}-style decoder"
    decoder += f" initialised from `{dec.pretrained}`" if dec.pretrained else " trained from scratch"
    lines = [
        *front, "", f"# {repo_id.split('/')[-1]}", "",
        f"An image captioning model made with mmcap {_version()}: a ResNet encoder and a Transformer decoder "
        "that cross-attends to the image grid.", "",
        "## Architecture", "",
        f"- encoder: torchvision {enc.arch}, grid features at {cfg.image_size}x{cfg.image_size} px",
        f"- projection: {cfg.projection.kind} from the encoder grid to the decoder width",
        f"- decoder: {decoder}, {hf.num_hidden_layers} layers, "
        f"width {hf.hidden_size}, cross-attention to the image grid; vocabulary {len(captioner.tokenizer.hf)}",
        f"- {params / 1e6:.1f} M parameters; captions up to {cfg.max_caption_tokens} tokens",
        f"- decoding defaults (generation_config.json): {_options(captioner.generation_config.to_dict())}",
        "", "## Training data", "",
        ", ".join(f"`{d}`" for d in datasets) if datasets else "Not recorded.",
        "", "## Metrics", "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("Not recorded.")
    lines += [
        "", "## Usage", "", "```bash", "pip install mmcap", "```", "", "```python",
        "from mmcap import Captioner", "", f'model = Captioner.from_pretrained("{repo_id}")',
        'print(model.caption("photo.jpg"))', "", "# a whole folder or webdataset shards, streamed:",
        'for result in model.caption_stream(["photos/"], num_workers=2):',
        '    print(result["image"], result.get("caption"))', "```", "", "```bash",
        f"mmcap caption --model {repo_id} photos/ --output captions.jsonl", "```", "",
    ]
    return "\n".join(lines)


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if v is not None)


def _version() -> str:
    from mmcap import __version__

    return __version__
