"""Train rayssl's tiny CLIP on generated scenes and their captions (CPU, a minute or two).

    rayssl tiny-clip --out tiny_clip.pt [--steps 600] [--seconds 120]

No CLIP weights can be downloaded on an offline machine, so tests and benchmarks use this
model. It is the open_clip model config ``rayssl-tiny-clip`` (registered by
``rayssl.pseudolabel.clip.register_configs``) trained with open_clip's own contrastive loss
on scenes drawn from a stream disjoint from the training and evaluation scenes. The saved
file is a plain open_clip state dict, loaded by ``--clip-model rayssl-tiny-clip
--clip-pretrained PATH`` through the same ``open_clip.create_model(name, pretrained=PATH)``
call as a downloaded checkpoint.

Captions are varied so that the prompts of the labelling stage ("a photo of a {class}")
are in distribution: the scene caption, with or without colours, and prompts naming one
of the objects present.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rayssl.pseudolabel.clip import TINY_CLIP_NAME, register_configs

# A stream seed of its own: the CLIP never sees the scenes it later labels or is scored on.
TINY_CLIP_SCENE_SEED = 9_000_001


def _captions(rng: np.random.Generator, caption: str, classes: list[str]) -> str:
    r = rng.random()
    if r < 0.3:
        return "a photo of " + caption
    if r < 0.6:  # colours dropped: "a photo of a star and a ring"
        words = caption.replace(",", " ,").split()
        kept = " ".join(w for w in words if w not in _COLOUR_WORDS).replace(" ,", ",")
        return "a photo of " + kept  # articles are fixed by _fix_articles
    return f"a photo of a {classes[rng.integers(len(classes))]}"


def _colour_words() -> set[str]:
    from rayssl.data.scenes import COLOURS

    return set(COLOURS)


_COLOUR_WORDS = _colour_words()


def _fix_articles(text: str) -> str:
    out = []
    words = text.split(" ")
    for i, w in enumerate(words):
        if w in ("a", "an") and i + 1 < len(words):
            w = "an" if words[i + 1][:1] in "aeiou" else "a"
        out.append(w)
    return " ".join(out)


def train_tiny_clip(out: str, steps: int = 600, seconds: float = 120.0, batch_size: int = 64,
                    num_scenes: int = 4096, lr: float = 2e-3, seed: int = 0, log=None) -> dict:
    """Train and save the tiny CLIP; returns a small report (steps, final loss, seconds)."""
    import open_clip

    from rayssl.data.scenes import SHAPES, generate_batch

    register_configs()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model = open_clip.create_model(TINY_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    data = generate_batch(range(num_scenes), seed=TINY_CLIP_SCENE_SEED, size=size)
    classes = [[SHAPES[j] for j in np.flatnonzero(row)] for row in data["labels"]]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images = (torch.from_numpy(data["image"]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = open_clip.ClipLoss()
    model.train()
    step, loss_v = 0, float("nan")
    while step < steps and time.perf_counter() - t0 < seconds:
        idx = rng.choice(num_scenes, size=batch_size, replace=False)
        x = images[idx]
        if rng.random() < 0.5:
            x = x.flip(3)
        texts = [_fix_articles(_captions(rng, str(data["caption"][i]), classes[i])) for i in idx]
        img_f, txt_f, scale = model(x, tokenizer(texts))
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_v = float(loss.detach())
        if log and step % 50 == 0:
            log(f"tiny clip step {step}/{steps} loss {loss_v:.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    torch.save(model.state_dict(), out)
    return {"model": TINY_CLIP_NAME, "checkpoint": str(out), "steps": step, "final_loss": round(loss_v, 4),
            "seconds": round(time.perf_counter() - t0, 1)}
