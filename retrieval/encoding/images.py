"""Image decoding with typed errors and a bounded cost per image; a DataLoader dataset that never
crashes on a bad file (a file that does not decode yields a placeholder and its reason, counted by
the caller); and the split of a preprocessing pipeline into per-image and per-batch parts that bulk
encoding uses."""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import Compose, Normalize, ToTensor

from retrieval.errors import InvalidInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
IMAGE_FORMATS = tuple(sorted({Image.registered_extensions()[s] for s in IMAGE_SUFFIXES}))  # the only ones decoded
MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear error instead of a warning
# Longest side over shortest side an image keeps: beyond it, the long side is center-cropped.
# Encoders resize the short side to their input size and center-crop a square, so the crop only
# drops pixels they discard anyway, while bounding the resize's output at 4 squares: a 20000x1
# image would otherwise resize to 4,480,000x224 (4 GB and half a minute for one query). 4 leaves
# every usual photo format untouched, bit for bit (4:3, 3:2, 16:9, phone screens at 19.5:9, 21:9
# and 32:9 ultrawide); only wider panoramas resample from a cropped image (their central square
# then differs from the uncropped resize by resampling rounding, not in content).
MAX_ASPECT = 4


def load_image(source: str | Path | bytes, min_side: int | None = None) -> Image.Image:
    """Decode a file path or raw bytes into an RGB image (first frame of a GIF), at bounded cost:
    a header declaring more than MAX_PIXELS pixels, or none, is refused before decoding, and an
    image longer than MAX_ASPECT times its short side is center-cropped to that ratio. With
    `min_side`, a JPEG is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales whose sides
    stay at least `min_side` (PIL's draft mode): a 12-megapixel photo meant for a 224-px encoder
    decodes several times faster, and the encoder's resize starts from ample pixels."""
    what = "image bytes" if isinstance(source, (bytes, bytearray)) else f"'{source}'"
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise InvalidInputError("image bytes are empty")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidInputError(f"{what} does not exist")
            if path.stat().st_size == 0:
                raise InvalidInputError(f"{what} is a zero-byte file")
            fp = path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as img:
                img.seek(0)
                if min_side and img.format == "JPEG":
                    img.draft("RGB", (min_side, min_side))  # sets the size that will be decoded
                if img.width < 1 or img.height < 1:
                    raise InvalidInputError(f"{what}: the header declares {img.width}x{img.height} pixels, none")
                if img.width * img.height > MAX_PIXELS:
                    raise InvalidInputError(
                        f"{what}: the header declares {img.width}x{img.height} pixels, over the limit of {MAX_PIXELS:,}"
                    )
                img.load()  # force the full decode here: truncated files fail now, not later
                return bounded_aspect(img).convert("RGB")
    except InvalidInputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:  # PIL's own bound, at open
        raise InvalidInputError(f"{what}: the header declares too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise InvalidInputError(f"{what} is not a decodable image ({type(e).__name__})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's truncated/corrupt-data errors
        raise InvalidInputError(f"{what} could not be decoded: {e}") from e


def bounded_aspect(img: Image.Image) -> Image.Image:
    """`img`, or its center cropped along the long side to MAX_ASPECT times the short side."""
    w, h = img.size
    if w > MAX_ASPECT * h:
        left = (w - MAX_ASPECT * h) // 2
        return img.crop((left, 0, left + MAX_ASPECT * h, h))
    if h > MAX_ASPECT * w:
        top = (h - MAX_ASPECT * w) // 2
        return img.crop((0, top, w, top + MAX_ASPECT * w))
    return img


def split_transform(transform: Callable) -> tuple[Callable, Callable[[torch.Tensor], torch.Tensor]]:
    """(per-image part, per-batch part) of a preprocessing pipeline. A `Compose` that ends in
    ToTensor + Normalize (open_clip's and torchvision's) splits into its PIL steps ending in uint8
    pixels (H, W, C), and one per-batch step that scales, normalizes and lays them out as the
    encoder wants them: (B, C, H, W) float in channels-last memory. A quarter of the bytes leave a
    decoding worker, four vectorized passes per batch replace five small ones per image, and the
    encoder's own channels-last copy becomes a no-op (Lite0's 224-px preprocessing on 2 cores:
    0.49 -> 0.05 ms per image). On the CPU the values are bit for bit the whole transform's, stacked
    (on a GPU, torch divides by 255 as a multiplication by its reciprocal: within an ulp).
    Any other transform stays whole; its batch part is the identity."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize):
        normalize = steps[-1]

        @functools.lru_cache(maxsize=8)
        def along_a_row(device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:  # 2x (W*C,)
            return tuple(
                torch.as_tensor(v, dtype=torch.float32, device=device).repeat(width)
                for v in (normalize.mean, normalize.std)
            )

        def per_batch(hwc: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) uint8 -> (B, C, H, W) float
            assert hwc.dtype == torch.uint8, f"per-batch preprocessing takes uint8 pixels, got {hwc.dtype}"
            x = hwc.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
            # Normalize rows of pixels (B*H, W*C) against the mean and std repeated along a row: the
            # same float operations as Normalize's, but over long contiguous rows where a (C,)
            # operand would make torch loop over C=3 values at a time (5x slower).
            mean, std = along_a_row(x.device, x.shape[2])
            x.view(-1, x.shape[2] * x.shape[3]).sub_(mean).div_(std)
            return x.permute(0, 3, 1, 2)

        return Compose(steps[:-2] + [pil_to_hwc_uint8]), per_batch
    return transform, lambda pixels: pixels


def pil_to_hwc_uint8(img: Image.Image) -> torch.Tensor:
    """(H, W, C) uint8 pixels of an 8-bit image, what ToTensor scales to [0, 1]."""
    pixels = np.array(img)
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected an 8-bit image, got mode {img.mode}")
    return torch.from_numpy(pixels if pixels.ndim == 3 else pixels[:, :, None])


class ImageFileDataset(torch.utils.data.Dataset):
    """(index, pixels, error) per path; error is "" for a good image. A bad file gives
    `placeholder` so the batch still collates, and its reason so the caller can skip and report it.
    Images are decoded at no less than `min_side` pixels a side (see load_image).
    With `seed`, a random transform draws from torch's RNG seeded by (seed, index) for each item,
    so random crops do not depend on batch size, worker count or order (this reseeds the RNG
    of the process that decodes: in-process callers fork it around the loop)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable,
        min_side: int,
        placeholder: torch.Tensor,
        seed: int | None = None,
    ):
        self.paths, self.transform, self.min_side, self.placeholder, self.seed = (
            list(paths),
            transform,
            min_side,
            placeholder,
            seed,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.seed is not None:
            torch.manual_seed(self.seed * 1_000_003 + i)
        try:
            return i, self.transform(load_image(self.paths[i], min_side=self.min_side)), ""
        except InvalidInputError as e:
            return i, self.placeholder, str(e)
