"""Bulk image loading: the pixels the encoder gets do not depend on how they were decoded
(in a worker process or not, batch size), and CPU forward passes reuse memory."""

import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from retrieval.encoding.bulk import image_loader
from retrieval.encoding.images import load_image, split_transform


@pytest.fixture()
def mixed_images(flickr_mini, tmp_path):
    """Real photos, one enlarged PNG (exercises the resize), one grayscale JPEG, one bad file."""
    photos = sorted((flickr_mini / "images").glob("*.jpg"))[:5]
    Image.open(photos[0]).resize((640, 480)).save(tmp_path / "big.png")
    Image.open(photos[1]).convert("L").save(tmp_path / "gray.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    return photos + [tmp_path / "big.png", tmp_path / "gray.jpg", tmp_path / "bad.jpg"]


@pytest.mark.parametrize("batch_size,workers", [(3, 0), (4, 1), (8, 0)])
def test_bulk_loading_gives_the_whole_transforms_pixels_bit_for_bit(default_model, mixed_images, batch_size, workers):
    _, preprocess, _ = default_model
    good = mixed_images[:-1]
    expected = torch.stack([preprocess(load_image(p, min_side=224)) for p in good])
    batches = list(image_loader(mixed_images, preprocess, 224, batch_size, workers))
    indices = torch.cat([idx for idx, _, _ in batches]).tolist()
    pixels = torch.cat([px for _, px, _ in batches])
    errors = [e for _, _, errs in batches for e in errs]
    assert indices == list(range(len(mixed_images))), "batches keep the input order"
    assert pixels.dtype == torch.float32 and pixels.shape == (len(mixed_images), 3, 224, 224)
    assert all(px.is_contiguous(memory_format=torch.channels_last) for _, px, _ in batches), "the encoder's layout"
    assert torch.equal(pixels[: len(good)], expected)
    assert errors[:-1] == [""] * len(good) and "not a decodable image" in errors[-1]


def test_per_channel_normalization_is_bit_for_bit_too(mixed_images):
    """open_clip's default transform normalizes each channel differently (OpenAI's mean and std),
    unlike Lite0's one value for all three."""
    preprocess = image_transform(224, is_train=False)
    assert len(set(preprocess.transforms[-1].mean)) == 3 and split_transform(preprocess)[0] is not preprocess
    good = mixed_images[:-1]
    expected = torch.stack([preprocess(load_image(p, min_side=224)) for p in good])
    batches = [px for _, px, _ in image_loader(good, preprocess, 224, 4, 0)]
    assert all(px.is_contiguous(memory_format=torch.channels_last) for px in batches)
    assert torch.equal(torch.cat(batches), expected)


def mean_color(img: Image.Image) -> torch.Tensor:
    """A transform that is not a Compose (module level: a spawned worker unpickles it)."""
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).mean((0, 1))


def test_a_transform_without_a_tensor_tail_stays_whole(mixed_images):
    per_image, per_batch = split_transform(mean_color)
    assert per_image is mean_color and torch.equal(per_batch(torch.ones(2)), torch.ones(2))
    good = mixed_images[:-1]
    expected = torch.stack([mean_color(load_image(p, min_side=8)) for p in good])
    for workers in (0, 1):
        got = torch.cat([px for _, px, _ in image_loader(good, mean_color, 8, 4, workers)])
        assert torch.equal(got, expected)


# Counted in a fresh process, whose only busy threads are the forward pass's (a worker thread, as
# the server's executor runs it, and torch's intra-op threads): page faults are per process, and
# threads other tests leave behind (servers, loaders) would add theirs. The process starts with
# MALLOC_ARENA_MAX=1, as the container image does: without it each thread's own malloc arena
# unmaps its emptied heaps, and whether a pass faults depended on how the threads' allocations
# fell (3,000-120,000 faults in some runs, 0 in others). "untuned" is the control: create_model
# believes the tuning done and skips it.
FAULT_PROBE = """
import resource, sys, torch
from concurrent.futures import ThreadPoolExecutor
from retrieval.embedding import allocator
if sys.argv[1] == "untuned":
    allocator._done = True
from retrieval.embedding.factory import create_model
model = create_model("lite0-minilm")[0]
assert allocator._done, "create_model on the CPU tunes malloc (retrieval.embedding.allocator)"
x = torch.zeros(8, 3, 224, 224)

def passes(n):
    faults = []
    with torch.inference_mode():
        for _ in range(n):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model.encode_image(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

with ThreadPoolExecutor(1) as worker:
    worker.submit(passes, 4).result()  # the heap grows to its peak over the first 2-3 passes, then stays
    print(*worker.submit(passes, 5).result())
"""


def forward_pass_faults(mode: str) -> list[int]:
    """Minor page faults of each of 5 forward passes at batch 8, after 4 warm-up passes."""
    run = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return [int(n) for n in run.stdout.split()[-5:]]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
def test_cpu_forward_passes_reuse_memory_instead_of_faulting_in_new_pages():
    # The median pass: under load the intra-op threads' allocations can interleave in a new order and
    # grow the heap once more (a clean-clone run saw 5,890 faults in 3 passes, about 23 MB of new heap,
    # against 0 on most runs); what the tuning guarantees is that passes reuse it after that.
    faults = forward_pass_faults("tuned")
    assert statistics.median(faults) < 1000, f"minor page faults of 5 forward passes at batch 8: {faults}"
    # untuned glibc maps and unmaps every large activation: ~50,000 faults per pass at batch 8 here
    untuned = forward_pass_faults("untuned")
    assert statistics.median(untuned) > 10000, f"the control: without the tuning, passes fault pages in: {untuned}"
