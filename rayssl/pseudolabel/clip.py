"""Loading a CLIP model through open_clip (no Ray): a hub tag or a local checkpoint file.

``load_clip(name, pretrained)`` is the one code path for every CLIP the labelling job uses:
a real OpenAI/LAION checkpoint (``--clip-model ViT-B-32 --clip-pretrained openai`` on a
machine with network, or ``--clip-pretrained /path/to/open_clip_pytorch_model.bin``) and the
tiny CLIP that ``python -m rayssl.pseudolabel.tiny_clip`` trains here on generated scenes
(``--clip-model rayssl-tiny-clip --clip-pretrained tiny_clip.pt``). The tiny model is a custom
open_clip model config registered with ``open_clip.add_model_config`` (``register_configs``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# A CLIP small enough to train in a minute on 2 CPU cores: ModifiedResNet image tower
# (CNNs learn shapes from scratch much faster than a ViT), 2-layer text transformer.
TINY_CLIP_NAME = "rayssl-tiny-clip"
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


class ClipLoadError(ValueError):
    """The CLIP model or checkpoint cannot be found; the message names the option."""


def register_configs() -> None:
    """Register rayssl's custom open_clip model configs (idempotent, per process)."""
    import open_clip

    if TINY_CLIP_NAME in open_clip.list_models():
        return
    folder = Path(tempfile.gettempdir()) / f"rayssl-open-clip-configs-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_CLIP_NAME}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(TINY_CLIP_CONFIG))
    os.replace(tmp, path)
    open_clip.add_model_config(path)


def looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith(".")
            or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES))


def check_clip_args(name: str, pretrained: str) -> None:
    """Fail fast (before Ray starts) on an unknown model name, tag or missing checkpoint."""
    import open_clip

    register_configs()
    if not name:
        raise ClipLoadError("--clip-model: empty model name")
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower()[:4] in m.lower()][:8]
        raise ClipLoadError(
            f"--clip-model: open_clip does not know the model {name!r}"
            + (f" (similar: {', '.join(close)})" if close else "")
            + f"; `python -c 'import open_clip; print(open_clip.list_models())'` lists them, "
            f"and {TINY_CLIP_NAME!r} is rayssl's tiny test model"
        )
    if not pretrained:
        raise ClipLoadError("--clip-pretrained: give a hub tag (e.g. openai) or a checkpoint file path; "
                            "a CLIP with random weights would produce meaningless labels")
    if looks_like_path(pretrained) or os.path.exists(pretrained):
        if not os.path.isfile(pretrained):
            raise ClipLoadError(f"--clip-pretrained: checkpoint file not found: {pretrained}")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ClipLoadError(
            f"--clip-pretrained: {pretrained!r} is neither a file nor a hub tag of {name} "
            f"(tags: {', '.join(tags) if tags else 'none; pass a checkpoint file'})"
        )


@dataclass
class LoadedClip:
    model: torch.nn.Module  # open_clip CLIP, eval mode
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_clip(name: str, pretrained: str, device: str | torch.device = "cpu") -> LoadedClip:
    """The open_clip model ``name`` with weights ``pretrained`` (hub tag or local file)."""
    import open_clip

    check_clip_args(name, pretrained)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as exc:  # e.g. a hub tag on a machine without network
        raise ClipLoadError(f"--clip-pretrained: cannot load {pretrained!r} for {name}: {exc}") from None
    model.eval()
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return LoadedClip(model, open_clip.get_tokenizer(name), size,
                      tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                      tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)))
