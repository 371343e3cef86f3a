"""Fine-tuning an open_clip model (a tiny random-init architecture, no download) on a real
96-image Flickr8k cut: the loss falls, the checkpoint round-trips, resume continues, and an index
built with the tuned model serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_index, make_mini_dataset, make_tiny_open_clip

import retrieval.training.loop as loop
from retrieval.client import RetrievalClient
from retrieval.embedding.checkpoint import load_checkpoint
from retrieval.embedding.factory import create_model
from retrieval.errors import ConfigError, ModelError
from retrieval.serving.server import ServeConfig, ServerThread
from retrieval.training.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    _, ckpt = make_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))
    return f"open_clip:tiny-test-clip@{ckpt}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_mini_dataset(tmp_path_factory.mktemp("ft_data"), {"train": 64, "dev": 16, "test": 16})


def _cfg(data: Path, model: str, out: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(
        **{
            "data": str(data),
            "model": model,
            "out": str(out),
            "epochs": 4,
            "batch_size": 16,
            "lr": 1e-3,
            "warmup_epochs": 0.5,
            "workers": 0,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def lit_run(data, tiny, tmp_path_factory):
    cfg = _cfg(data, tiny, tmp_path_factory.mktemp("lit"))
    model, _, _ = create_model(cfg.model)
    frozen = {k: v.clone() for k, v in model.net.visual.state_dict().items()}
    return cfg, model, finetune(cfg, model), frozen


def test_lit_loss_falls_and_the_image_tower_stays_locked(lit_run):
    _, model, summary, frozen = lit_run
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    for key, value in model.net.visual.state_dict().items():
        torch.testing.assert_close(value, frozen[key].half().float(), msg=f"locked tower changed: {key}")


def test_the_checkpoint_round_trips_and_names_only_the_architecture(lit_run, data):
    cfg, model, summary, _ = lit_run
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["config"] == {"open_clip": "tiny-test-clip", "embed_dim": 32, "finetune": "lit"}
    loaded, preprocess, tokenizer = create_model(summary["checkpoint"])
    assert loaded.fingerprint() == model.fingerprint() == ckpt["fingerprint"]
    ids = tokenizer(["a dog runs on the grass", "two people on a beach"])
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)


def test_a_checkpoint_naming_an_unregistered_architecture_is_refused(lit_run, tmp_path):
    from retrieval.embedding.checkpoint import save_checkpoint

    _, model, _, _ = lit_run
    model.config = {**model.config, "open_clip": "os.system"}
    try:
        save_checkpoint(tmp_path / "evil.safetensors", model)
    finally:
        model.config = {**model.config, "open_clip": "tiny-test-clip"}
    with pytest.raises(ModelError, match="no architecture"):
        create_model(str(tmp_path / "evil.safetensors"))


def test_resume_after_an_interruption_gives_the_same_model(lit_run, data, tiny, tmp_path, monkeypatch):
    cfg, reference, summary, _ = lit_run
    real_save, saves = loop.save_checkpoint, []

    def save_then_die_after_epoch_2(path, model, **extra):
        real_save(path, model, **extra)
        saves.append(path.name)
        if saves.count("last.safetensors") == 2:
            raise KeyboardInterrupt  # as if the job were killed right after epoch 2's checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(data, tiny, tmp_path), create_model(tiny)[0])
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed, _, _ = create_model(tiny)
    again = finetune(_cfg(data, tiny, tmp_path, resume=True), resumed)
    assert [h["epoch"] for h in again["history"]] == list(range(cfg.epochs))
    assert [h["loss"] for h in again["history"]] == pytest.approx([h["loss"] for h in summary["history"]])
    assert resumed.fingerprint() == reference.fingerprint()


def test_full_finetune_tunes_both_towers(data, tiny, tmp_path):
    model, _, _ = create_model(tiny)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    summary = finetune(_cfg(data, tiny, tmp_path, finetune="full", epochs=2), model)
    changed = {
        k.split(".")[0] for k, v in model.net.state_dict().items() if not torch.equal(v, before[k].half().float())
    }
    assert {"visual", "transformer"} <= changed
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]


def test_bad_settings_are_config_errors(data, tiny):
    with pytest.raises(ConfigError, match="finetune"):
        FinetuneConfig(data=str(data), model=tiny, finetune="half")
    with pytest.raises(ConfigError, match="open_clip"):
        FinetuneConfig(data=str(data), model="lite0-minilm")


def test_an_index_built_with_the_tuned_model_serves(lit_run, data, tmp_path):

    _, model, summary, _ = lit_run
    root = tmp_path / "index"
    build_index(root, "--dataset", str(data), "--split", "test", "--model", summary["checkpoint"])
    names = (data / "splits" / "test.txt").read_text().split()
    image = (data / "images" / names[3]).read_bytes()
    # the version carries its own copy of the checkpoint, so the server needs no --model
    with (
        ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1)) as srv,
        RetrievalClient(srv.address, timeout=30) as c,
    ):
        hits = c.search_image(image, k=3, target="image")
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        found = c.search_text("a dog runs through the grass", k=5)
        assert len(found) == 5 and all(np.isfinite(h.score) for h in found)


def test_the_train_command_takes_finetuning_defaults_unless_a_flag_sets_them(tiny):
    from retrieval.cli import build_parser
    from retrieval.commands.train import finetune_config

    args = build_parser().parse_args(["train", "--model", tiny, "--data", "d", "--finetune", "full", "--lr", "3e-4"])
    cfg = finetune_config(args)
    assert (cfg.finetune, cfg.lr, cfg.epochs, cfg.batch_size, cfg.out) == ("full", 3e-4, 5, 64, "runs/finetune")


def test_head_training_flags_are_refused_for_finetuning_not_ignored(tiny):
    from retrieval.cli import build_parser
    from retrieval.commands.train import finetune_config

    args = build_parser().parse_args(["train", "--model", tiny, "--data", "d", "--loss", "vsepp", "--no-center"])
    with pytest.raises(ConfigError, match=r"^--loss, --center: head training only, not open_clip fine-tuning$"):
        finetune_config(args)
