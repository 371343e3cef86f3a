"""The image-tower levers (issue 16): tune the top stage of EfficientNet-Lite0 with the heads (lever 2),
and pool its spatial features with VSE-infinity's generalized pooling (GPO; Chen et al. 2021)
instead of the average (lever 4). Used by `bench_levers.py --section image-top`.

The frozen part of the tower runs once: the output of block 5, the input of the top stage
(B, 192, 7, 7), is cached per image view in float16. Everything above it is `ImageTop`: block 6,
the 1x1 conv head, and a pooling of each tapped map ([5, 6, "head"], the shipped taps) to the
same 1792 columns the shipped features have. Every arm (frozen or tuned, mean or GPO) goes through
`top_tuning.train_heads_and_top` with the same schedule, so their difference is the lever alone.

GPO here: each channel's 49 spatial values sorted in decreasing order, then a weighted sum with
learned weights over the sorted positions (softmax of learned scores, one set per tap, started
uniform: the average). The paper generates those weights with a GRU over positional encodings so
one model serves any number of regions; a Lite0 map always has 49, so the weights are learned
directly.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from top_tuning import in_chunks, train_heads_and_top

from retrieval.embedding.factory import image_preprocess
from retrieval.encoding.bulk import IMAGE_BATCH, image_loader
from retrieval.progress import meter
from retrieval.training.feature_cache import FeatureCache
from retrieval.training.train import SplitFeatures, TrainConfig

CUT = 5  # cached: the output of blocks[CUT]; tuned: blocks[CUT + 1:] and the conv head


class TapPool(nn.Module):
    """Pools tapped maps (B, C, P) over their P positions to (B, C): "mean" (the shipped tower) or
    "gpo": per channel, values sorted high to low, weighted by softmax(scores / 0.1) (the paper's
    temperature), one set of scores per tap (`widths`: its channels), started at zero (the mean)."""

    def __init__(self, kind: str, widths: list[int], positions: int):
        super().__init__()
        assert kind in ("mean", "gpo"), kind
        self.register_buffer("tap_of_column", torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths)))
        self.scores = nn.Parameter(torch.zeros(len(widths), positions)) if kind == "gpo" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, P) -> (B, C)
        if self.scores is None:
            return x.mean(-1)
        ranked = x.sort(dim=-1, descending=True).values  # (B, C, P)
        weights = torch.softmax(self.scores / 0.1, dim=-1)[self.tap_of_column]  # (C, P)
        return (ranked * weights).sum(-1)


class ImageTop(nn.Module):
    """Copies of the tower's top stage and conv head over cached block-5 maps, then each tap's map
    pooled: (B, 192, 7, 7) -> `tapped` (B, 192 + 320 + 1280, 49) -> `pool` (B, 1792). `tune`: the
    copies' convolutions and batch-norm affines train (running statistics stay the pretrained
    ones: 6,000 images are too few to re-estimate them); `pool`: "mean" or "gpo" (`TapPool`)."""

    def __init__(self, tower, tune: bool, pool: str):
        super().__init__()
        assert tower.taps == [CUT, CUT + 1, "head"], f"the lever assumes the shipped taps, not {tower.taps}"
        net = tower.net
        self.stages = copy.deepcopy(net.blocks[CUT + 1 :])
        self.head = nn.Sequential(copy.deepcopy(net.conv_head), copy.deepcopy(net.bn2))
        for p in list(self.stages.parameters()) + list(self.head.parameters()):
            p.requires_grad_(tune)
        widths = [net.blocks[CUT][-1].conv_pwl.out_channels, net.blocks[-1][-1].conv_pwl.out_channels, net.num_features]
        self.pool = TapPool(pool, widths, (tower.image_size // 32) ** 2)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():  # running statistics stay frozen
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def tapped(self, maps: torch.Tensor) -> torch.Tensor:  # (B, 192, 7, 7) float16 -> (B, 1792, 49)
        x5 = maps.float().contiguous(memory_format=torch.channels_last)
        x6 = self.stages(x5)
        return torch.cat([x5, x6, self.head(x6)], dim=1).flatten(2)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # (B, 192, 7, 7) -> (B, 1792)
        return self.pool(self.tapped(maps))


@torch.no_grad()
def block_maps(tower, paths: list[str], transform, seed: int, desc: str) -> np.ndarray:
    """The output of blocks[CUT] for each image, float16 (N, 192, 7, 7); crops seeded per item
    as `encode_image_files` seeds them, so view v is the crop the shipped features saw."""
    net, out = tower.net, None
    loader = image_loader(paths, transform, tower.image_size, IMAGE_BATCH, workers=None, seed=seed)
    with torch.random.fork_rng(), torch.inference_mode(), meter(len(paths), desc, "img") as bar:
        for idx, pixels, errors in loader:
            assert not any(errors), errors  # Flickr8k decodes; the lever does not handle skips
            x = net.bn1(net.conv_stem(pixels.contiguous(memory_format=torch.channels_last)))
            for block in net.blocks[: CUT + 1]:
                x = block(x)
            if out is None:
                out = np.zeros((len(paths), *x.shape[1:]), np.float16)
            out[idx.numpy()] = x.half().numpy()
            bar.update(len(idx))
    return out


def split_maps(model, f: SplitFeatures, cfg: TrainConfig, views: int) -> torch.Tensor:
    """Block maps of a split's images, (V, N, 192, 7, 7) float16, cached like `split_features`."""
    cache, paths = FeatureCache(cfg.cache_dir), [str(p) for p in f.dataset.image_paths()]
    per_view = []
    for v in range(views):
        transform = image_preprocess(model, train=v > 0, crop_scale=(cfg.crop_scale_min, 1.0))
        recipe = f"blocks[:{CUT + 1}] maps|{transform}|view={v}|seed={cfg.seed}|crops seeded per item"
        key = cache.key(model.image_tower, paths, recipe)
        maps, _ = cache.get_or_compute(
            key,
            lambda t=transform, v=v: (
                block_maps(model.image_tower, paths, t, cfg.seed * 1000 + v, f"block maps, view {v + 1}/{views}"),
                {},
            ),
        )
        per_view.append(torch.from_numpy(maps))
    return torch.stack(per_view)


def check_top_matches_tower(model, maps: torch.Tensor, features: torch.Tensor) -> float:
    """Largest difference between the shipped features and cached maps + the untrained mean top."""
    with torch.no_grad():
        diff = (ImageTop(model.image_tower, tune=False, pool="mean").eval()(maps) - features).abs().max().item()
    assert diff < 5e-2, f"cached maps + the top stage differ from the tower's features by {diff}"
    return diff


def train_image_top(
    model,
    splits: dict[str, SplitFeatures],
    maps: dict[str, torch.Tensor],
    *,
    tune: bool,
    pool: str,
    epochs: int,
    top_lr: float = 1e-4,
) -> dict:
    """One arm: fresh heads over ImageTop(tune, pool), selected on dev, scored on test.
    A frozen top is run once per split (its output does not change), a tuned one per batch."""
    top = ImageTop(model.image_tower, tune, pool)
    tapped: dict[str, torch.Tensor] = {}  # a frozen top's tapped maps, (V, N, 1792, 49) float16
    if not tune:
        with torch.no_grad():
            for split, m in maps.items():
                tapped[split] = torch.stack(
                    [
                        in_chunks(lambda r, m=m, v=v: top.tapped(m[v, r]).half(), torch.arange(m.shape[1]))
                        for v in range(len(m))
                    ]
                )

    def image_features(split: str, rows: torch.Tensor | None, view: torch.Tensor | int) -> torch.Tensor:
        if rows is None:  # a whole split, one view (evaluation and centering)
            return in_chunks(lambda r: image_features(split, r, view), torch.arange(maps[split].shape[1]))
        if tune:
            return top(maps[split][view, rows])
        return top.pool(tapped[split][view, rows].float())

    def text_features(split: str, rows: torch.Tensor | None) -> torch.Tensor:
        t = splits[split].text
        return t if rows is None else t[rows]

    return train_heads_and_top(
        model,
        top,
        splits,
        image_features,
        text_features,
        desc=f"image top ({'tuned' if tune else 'frozen'}, {pool})",
        epochs=epochs,
        top_lr=top_lr,
        top_weight_decay=0.05,
    )
