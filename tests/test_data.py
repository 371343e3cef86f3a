"""Bad input to training and evaluation: one clear error, or a counted and reported skip."""

import shutil

import numpy as np
import pytest

from retrieval.cli import main as retrieval_main
from retrieval.encoding.datasets import load_caption_dataset
from retrieval.encoding.images import load_image
from retrieval.errors import DatasetError, InvalidInputError


@pytest.fixture
def dataset(flickr_mini, tmp_path):
    dest = tmp_path / "ds"
    shutil.copytree(flickr_mini, dest)
    return dest


def test_a_folder_without_captions_csv_is_one_clear_error(dataset, capsys):
    (dataset / "captions.csv").unlink()
    with pytest.raises(DatasetError, match="no captions.csv"):
        load_caption_dataset(dataset, "test")
    assert retrieval_main(["eval", "--data", str(dataset), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "no captions.csv" in err and "Traceback" not in err


def test_a_split_naming_unknown_images_is_an_error_and_unknown_splits_are_listed(dataset):
    with (dataset / "splits" / "test.txt").open("a") as f:
        f.write("not_in_captions.jpg\n")
    with pytest.raises(DatasetError, match="1 image.*no captions.*not_in_captions.jpg"):
        load_caption_dataset(dataset, "test")
    with pytest.raises(DatasetError, match="available splits: .*'dev'"):
        load_caption_dataset(dataset, "validation")


def test_empty_captions_and_missing_images_are_skipped_and_reported(dataset):
    names = (dataset / "splits" / "test.txt").read_text().split()
    (dataset / "images" / names[0]).unlink()
    with (dataset / "captions.csv").open("a") as f:
        f.write(f'{names[1]},"   "\n')
    ds = load_caption_dataset(dataset, "test")
    reasons = dict(ds.skipped)
    assert reasons[names[0]] == "image file is missing"
    assert any("empty caption" in r for r in reasons.values())
    assert names[0] not in ds.images and len(ds.images) == len(names) - 1
    assert len(ds.captions) == 5 * len(ds.images)
    assert np.all(ds.caption_image < len(ds.images))


def test_an_unreadable_image_is_skipped_and_reported_by_eval(dataset, default_model, capsys):
    names = (dataset / "splits" / "test.txt").read_text().split()
    (dataset / "images" / names[2]).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    data = (dataset / "images" / names[3]).read_bytes()
    (dataset / "images" / names[3]).write_bytes(data[: len(data) // 3])  # truncated
    assert retrieval_main(["eval", "--data", str(dataset), "--split", "test", "--json", "--workers", "0"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    skipped = {s["item"]: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {names[2], names[3]}
    assert result["images"] == len(names) - 2 and result["captions"] == 5 * (len(names) - 2)
    assert 0 <= result["recall"]["t2i_R@1"] <= 100 and "modality_gap" in result["geometry"]


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty"),
        (b"GIF89a not really", "not a decodable image|could not be decoded"),
        (b"plain text", "not a decodable image"),
    ],
)
def test_load_image_errors_name_the_problem(payload, reason):
    with pytest.raises(InvalidInputError, match=reason):
        load_image(payload)


def test_large_jpegs_decode_at_a_reduced_scale_never_below_the_encoder_size(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1200), (200, 30, 30)).save(path, quality=90)
    assert load_image(path).size == (2000, 1200)
    # 1/4 scale: the 1/8 one (250x150) would fall below the 224-px side the encoder needs
    assert load_image(path, min_side=224).size == (500, 300)
    assert load_image(path.read_bytes(), min_side=224).size == (500, 300)
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1200), (200, 30, 30)).save(png)
    assert load_image(png, min_side=224).size == (2000, 1200)  # only JPEG has reduced-scale decoding
