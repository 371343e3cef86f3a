"""The dual encoder: unit-norm outputs, the registry, open_clip checkpoints, save/load round trip."""
import json

import numpy as np
import pytest
import torch

from retrieval.errors import ModelError
from retrieval.embedding.factory import create_model, list_models
from retrieval.encoding.images import load_image


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
    from retrieval.encoding.datasets import load_caption_dataset
    from retrieval.sphere.recall import recall_at_k
    from retrieval.encoding.bulk import encode_image_files, encode_texts

    model, preprocess, tokenizer = default_model
    ds = load_caption_dataset(flickr_mini, "test")
    img, bad = encode_image_files(model, ds.image_paths(), preprocess, workers=0, progress=False)
    txt = encode_texts(model, tokenizer, ds.captions, progress=False)
    r = recall_at_k(img, txt, ds.caption_image)
    assert not bad
    assert r["t2i_R@1"] > 5 * 100 / len(ds.images) and r["i2t_R@5"] > 50  # chance: 3% and 16%


def _tiny_open_clip(tmp_path):
    import open_clip

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-test-clip.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-test-clip")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": reference.state_dict()}, ckpt)
    return reference.eval(), ckpt


def test_open_clip_architecture_loads_a_local_checkpoint(tmp_path):
    reference, ckpt = _tiny_open_clip(tmp_path)
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
    bogus = tmp_path / "bogus.pt"
    torch.save({"hello": 1}, bogus)
    with pytest.raises(ModelError, match="not a retrieval-sphere-checkpoint"):
        create_model(str(bogus))
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot be read"):
        create_model(str(tmp_path / "garbage.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: 'cuda' would load")
def test_an_unusable_device_is_one_clear_error():
    for device in ("cuda", "tpu-of-dreams"):
        with pytest.raises(ModelError, match=f"cannot run the model on device '{device}'.*available here: cpu"):
            create_model("lite0-minilm", device=device)


def test_heads_saved_before_query_banks_existed_still_load(tmp_path):
    """A checkpoint without bank tensors loads with no correction and keeps its fingerprint."""
    from retrieval.embedding.checkpoint import save_checkpoint
    from retrieval.embedding.querybank import querybank_of

    model, _, _ = create_model("lite0-minilm", load_weights=False)
    path = save_checkpoint(tmp_path / "old.pt", model)
    payload = torch.load(path, weights_only=False)
    payload["heads"] = {k: v for k, v in payload["heads"].items() if k not in ("text_bank", "image_bank", "querybank_beta")}
    torch.save(payload, path)
    loaded, _, _ = create_model(str(path))
    assert loaded.fingerprint() == payload["fingerprint"] == model.fingerprint()
    assert querybank_of(loaded).info() == {"method": "none", "beta": 0.0, "text_bank": 0, "image_bank": 0}
