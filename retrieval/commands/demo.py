"""`retrieval demo`: the whole product on an embedded default, no user data needed.

It writes a small gallery of real photographs that ship inside scikit-image (`skimage.data`,
loaded offline) with a caption for each, or takes `--images DIR`; builds an index version with
the index builder; starts the gRPC server on a free loopback port; asks it text-to-image and
image-to-text queries through the Python client; prints the answers; and stops the server.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# skimage.data image -> a caption in the style of Flickr8k's.
GALLERY = {
    "astronaut": "A woman astronaut in a white space suit smiles in front of a flag .",
    "camera": "A man in a dark coat looks through a camera on a tripod in a field .",
    "chelsea": "An orange tabby cat looks up at the camera .",
    "coffee": "A cup of coffee with a spoon on a red saucer .",
    "rocket": "A rocket stands on its launch pad under a blue sky .",
    "coins": "Old coins lie on a dark table .",
    "clock": "A clock on a shelf next to a white wall .",
    "moon": "The grey surface of the moon is covered in craters .",
    "hubble_deep_field": "Galaxies and stars are scattered across the dark night sky .",
    "stereo_motorcycle": "A red motorcycle is parked inside a garage .",
    "page": "A page of printed text from an old book .",
    "brick": "A wall made of grey bricks .",
    "grass": "Green grass seen up close .",
    "immunohistochemistry": "Cells under a microscope stained brown and blue .",
    "retina": "A photograph of the back of a human eye .",
}
TEXT_QUERIES = ["a cat", "a man with a camera", "a cup of coffee", "a motorbike"]
IMAGE_QUERIES = ["chelsea", "rocket"]


def write_gallery(dest: Path) -> tuple[Path, Path]:
    """Save the skimage.data photographs as JPEGs under dest/images and their captions as CSV."""
    import numpy as np
    import skimage.data
    from PIL import Image

    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in GALLERY:
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo pairs: keep the left view
            pixels = pixels[0]
        Image.fromarray(np.asarray(pixels)).convert("RGB").save(images / f"{name}.jpg", quality=92)
    captions = dest / "captions.csv"
    with captions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows((f"{name}.jpg", caption) for name, caption in GALLERY.items())
    return images, captions


def run_demo(work: Path, images: Path | None, model: str, k: int) -> int:
    from index_builder.cli import main as index_builder_main
    from index_builder.sources import scan_image_folder
    from retrieval.client import RetrievalClient
    from retrieval.commands.query import format_results
    from retrieval.serving.server import ServeConfig, ServerThread

    if images is None:
        images, captions = write_gallery(work / "gallery")
        image_queries = [images / f"{name}.jpg" for name in IMAGE_QUERIES]
        print(f"gallery: {len(GALLERY)} photographs from scikit-image with one caption each -> {images}")
    else:
        captions = None
        image_queries = list(scan_image_folder(images)[0].values())[:2]  # two of the images the builder indexes
    root = work / "index"
    argv = ["-q", "build", "--out", str(root), "--images", str(images), "--model", model, "--no-progress"]
    if captions is not None:
        argv += ["--captions", str(captions)]
    print(f"building the index under {root} ...")
    code = index_builder_main(argv)
    if code != 0:
        print("demo: the index build failed (see above)")
        return code
    config = ServeConfig(index=str(root), host="127.0.0.1", port=0, metrics_port=-1)
    print("starting the gRPC server ...")
    with ServerThread(config) as server, RetrievalClient(server.address, timeout=60) as client:
        info = client.index_info()
        print(
            f"serving {info.version} at {server.address}: {info.image_count} images, {info.text_count} captions, "
            f"model {info.model} ({info.model_fingerprint})\n"
        )
        for text in TEXT_QUERIES:
            print(f"text -> image: {text!r}")
            print(format_results(client.search_text(text, k=k)) + "\n")
        if captions is not None:
            for path in image_queries:
                print(f"image -> text: {path.name}")
                print(format_results(client.search_image(path, k=k)) + "\n")
        else:
            for path in image_queries:
                print(f"image -> image: {path.name}")
                print(format_results(client.search_image(path, k=k, target="image")) + "\n")
    print("server stopped; demo done.")
    return 0


def run(args: argparse.Namespace) -> int:
    images = Path(args.images) if args.images else None
    if args.work:
        return run_demo(Path(args.work), images, args.model, args.k)
    with tempfile.TemporaryDirectory(prefix="retrieval-demo-") as tmp:
        return run_demo(Path(tmp), images, args.model, args.k)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build an index over a small real gallery, serve it, query it, stop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", default=None, help="use this image folder instead of the scikit-image gallery")
    p.add_argument("--model", default="lite0-minilm", help="model name or checkpoint (default: %(default)s)")
    p.add_argument("--work", default=None, help="keep the gallery and index here (default: a temporary folder)")
    p.add_argument("--k", type=int, default=3, help="results per query (default: %(default)s)")
    p.set_defaults(func=run)
