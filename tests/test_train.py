"""Training on a small real subset: the loss falls, checkpoints round-trip, resume is exact."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import retrieval.training.loop as loop
from retrieval.embedding.checkpoint import load_checkpoint
from retrieval.embedding.factory import create_model
from retrieval.encoding.bulk import encode_texts
from retrieval.training.train import TrainConfig, train


def _cfg(data, tmp_path, **kw):
    base = dict(
        data=str(data),
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path.parent / "feature-cache"),
        views=2,
        epochs=6,
        batch_size=16,
        lr=3e-3,
        warmup_epochs=1,
        workers=0,
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(flickr_mini, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(flickr_mini, tmp)
    model, _, _ = create_model(cfg.model, load_weights=False)
    return cfg, model, train(cfg, model)


def test_contrastive_loss_falls_on_real_pairs(trained):
    _, _, summary = trained
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses}"
    assert all(1.0 <= h["logit_scale"] <= 100.0 for h in summary["history"])


def test_checkpoint_is_self_describing_and_round_trips_exactly(trained, flickr_mini):
    cfg, model, summary = trained
    assert summary["checkpoint"].endswith("model.safetensors")
    best = load_checkpoint(summary["checkpoint"])
    assert best["config"]["embed_dim"] == model.embed_dim and best["fingerprint"]
    assert best["data"]["train_images"] == 48 and best["data"]["views"] == 2
    assert "dev" in best["metrics"] and best["train_config"]["seed"] == 3
    # train() leaves the model equal to the exported model.safetensors (best epoch, float16-rounded heads)
    loaded, _, tokenizer = create_model(summary["checkpoint"])
    captions = ["A man rides a bike .", "A black dog swims in a lake ."]
    np.testing.assert_array_equal(
        encode_texts(model.eval(), tokenizer, captions, progress=False),
        encode_texts(loaded, tokenizer, captions, progress=False),
    )
    assert loaded.fingerprint() == model.fingerprint()
    # the inverted softmax's banks ship in the file: every training caption (240 < the bank size
    # of 1,000) and image, and the beta chosen on dev
    qb = best["metrics"]["querybank"]
    assert (loaded.text_bank.shape, loaded.image_bank.shape) == ((240, model.embed_dim), (48, model.embed_dim))
    assert torch.equal(loaded.text_bank, model.text_bank) and float(loaded.querybank_beta) == qb["beta"]
    assert max(qb["dev_R@1_mean_by_beta"].values()) == qb["dev_R@1_mean_by_beta"][str(qb["beta"])]
    summary_file = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary_file["best_dev_R@1_mean"] == summary["best_dev_R@1_mean"]


def test_a_rerun_writes_the_same_checkpoint_bytes(trained):
    """What the README's reproduction relies on: training is seeded and the file holds no timestamps."""
    cfg, _, summary = trained
    first = Path(summary["checkpoint"]).read_bytes()
    again = train(cfg, create_model(cfg.model, load_weights=False)[0])
    assert again["checkpoint"] == summary["checkpoint"] and Path(again["checkpoint"]).read_bytes() == first


def test_resume_after_an_interruption_gives_the_same_model(trained, flickr_mini, tmp_path, monkeypatch):
    _, reference, _ = trained
    cfg = _cfg(flickr_mini, tmp_path)
    real_save, saves = loop.save_checkpoint, []

    def save_then_die_after_epoch_3(path, model, **extra):
        real_save(path, model, **extra)
        saves.append(path.name)
        if saves.count("last.safetensors") == 3:
            raise KeyboardInterrupt  # as if the job were killed right after epoch 3's checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, create_model(cfg.model, load_weights=False)[0])
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed, _, _ = create_model(cfg.model, load_weights=False)
    summary = train(TrainConfig(**{**cfg.__dict__, "resume": True}), resumed)
    assert [h["epoch"] for h in summary["history"]] == list(range(6))
    for key, value in reference.head_state_dict().items():
        torch.testing.assert_close(resumed.head_state_dict()[key], value, msg=f"{key} differs after resume")


def test_augmented_views_do_not_depend_on_workers_or_batch_size(flickr_mini, default_model):
    """The cached training crops are the same whatever machine (worker count) encodes them."""
    from retrieval.embedding.factory import image_preprocess
    from retrieval.encoding.bulk import encode_image_files
    from retrieval.encoding.datasets import load_caption_dataset

    model = default_model[0]
    paths = load_caption_dataset(str(flickr_mini), "train").image_paths()[:6]
    crops = image_preprocess(model, train=True)
    runs = [
        encode_image_files(model, paths, crops, project=False, batch_size=b, workers=w, seed=7, progress=False)[0]
        for b, w in ((2, 0), (3, 1), (6, 0))
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], atol=1e-4)
    differently_seeded = encode_image_files(model, paths, crops, project=False, seed=8, progress=False)[0]
    assert not np.allclose(differently_seeded, runs[0], atol=1e-2)
    rng_before = torch.get_rng_state()
    encode_image_files(model, paths, crops, project=False, seed=7, workers=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG must be left untouched"


def test_retrieval_calibrate_writes_the_file_train_wrote(trained, flickr_mini, tmp_path):
    """train fits the calibration on its dev split after the query bank; `retrieval calibrate` on the
    same heads and split fits the same one (deterministic), so it rewrites model.safetensors byte for
    byte: calibrating the shipped heads gives the file a training run would write."""
    from retrieval.cli import main

    cfg, model, summary = trained
    assert set(model.calibration()) == {"t2i", "i2t"}
    assert load_checkpoint(summary["checkpoint"])["metrics"]["calibration"]["split"] == "dev"
    out = tmp_path / "calibrated.safetensors"
    assert (
        main(
            [
                "calibrate",
                "--model",
                summary["checkpoint"],
                "--data",
                str(flickr_mini),
                "--split",
                "dev",
                "--out",
                str(out),
                "--cache-dir",
                cfg.cache_dir,
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert out.read_bytes() == Path(summary["checkpoint"]).read_bytes()


def test_hardest_negative_loss_is_vsepps_hinge():
    hinge = loop.HardestNegativeLoss(margin=0.2)
    eye = torch.eye(2)
    assert hinge(eye, eye).item() == 0.0, "positives ahead of every negative by the margin cost nothing"
    # sim = [[1, 1], [0, 0]], positives (1, 0): image->text hinges 0.2 and 0.2, text->image 0 and 1.2
    assert hinge(eye, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(0.2 + 0.6)
    # three pairs: only the hardest negative of each row and column counts, not the sum of hinges
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.45, 0.5, 0.6], [0.3, 0.0, 0.4]])
    image, text = torch.eye(3), sim.T.contiguous()  # image @ text.T == sim
    to_text = [
        0.2 + 0.8 - 0.9,
        0.2 + 0.6 - 0.5,
        0.2 + 0.3 - 0.4,
    ]  # each row's worst caption (row 1: 0.3, not 0.15 + 0.3)
    to_image = [0.0, 0.2 + 0.8 - 0.5, 0.2 + 0.6 - 0.4]  # each column's worst image (column 0: no violation)
    assert hinge(image, text).item() == pytest.approx(sum(to_text) / 3 + sum(to_image) / 3)


def test_an_unknown_loss_is_one_line_before_any_work(capsys):
    from retrieval.cli import main

    assert main(["train", "--data", "no-such-folder", "--loss", "triplet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--loss: unknown loss 'triplet' (choose one of clip, siglip, vsepp)" in err
