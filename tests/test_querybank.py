"""The inverted softmax over a query bank: the bias formula, what it does to hubs, and fitting."""

import numpy as np

from retrieval.embedding.querybank import QueryBank, bias_from_bank, corrected_recall
from retrieval.sphere import l2_normalize
from retrieval.sphere.recall import recall_at_k
from retrieval.training.querybank_fit import fit_querybank


def hub_world(seed: int, n: int = 40, dim: int = 16, noise: float = 0.3):
    """Images, captions near their own image, and one hub image close to every caption's
    direction, which plain cosine search returns for many captions (hubness)."""
    shared = l2_normalize(np.random.default_rng(0).normal(size=(1, dim)))  # a direction all captions share
    rng = np.random.default_rng(seed)
    images = l2_normalize(rng.normal(size=(n, dim)) + 0.8 * shared)
    texts = l2_normalize(images + noise * rng.normal(size=(n, dim)) + 1.5 * shared)
    images[0] = l2_normalize(shared + 0.1 * rng.normal(size=(1, dim)))[0]  # the hub
    return images.astype(np.float32), texts.astype(np.float32), np.arange(n)


def test_bias_is_the_scaled_log_mean_exp_over_the_bank():
    rng = np.random.default_rng(0)
    gallery, bank = l2_normalize(rng.normal(size=(7, 5))), l2_normalize(rng.normal(size=(11, 5)))
    for beta in (0.5, 10.0, 50.0):
        expected = (
            -np.log(np.mean(np.exp(beta * (gallery.astype(np.float64) @ bank.T.astype(np.float64))), axis=1)) / beta
        )
        np.testing.assert_allclose(bias_from_bank(gallery, bank, beta), expected, rtol=1e-5, atol=1e-6)
    assert not bias_from_bank(gallery, bank, 0.0).any() and not bias_from_bank(gallery, bank[:0], 10.0).any()


def test_the_hub_is_scored_down_and_recall_rises():
    images, texts, owner = hub_world(seed=1)
    bank = hub_world(seed=2)[1]  # other captions, same world
    bias = bias_from_bank(images, bank, beta=10.0)
    assert bias[0] == bias.min(), "the hub, close to every bank query, must get the lowest bias"
    plain = recall_at_k(images, texts, owner)
    corrected = corrected_recall(images, texts, owner, QueryBank(bank, np.zeros((0, 16), np.float32), 10.0))
    assert corrected["t2i_R@1"] > plain["t2i_R@1"] + 10, (plain, corrected)
    assert corrected["i2t_R@1"] == plain["i2t_R@1"]  # captions had no bias


def test_fit_picks_the_dev_best_beta_and_keeps_a_bank_of_the_asked_size():
    images, texts, owner = hub_world(seed=3)
    train_images, train_texts, _ = hub_world(seed=4, n=200)
    bank, report = fit_querybank(train_texts, train_images, images, texts, owner, size=150, seed=0)
    by_beta = report["dev_R@1_mean_by_beta"]
    assert report["beta"] == bank.beta > 0 and by_beta[str(bank.beta)] == max(by_beta.values()) > by_beta["0.0"]
    assert bank.text.shape == bank.image.shape == (150, 16)
    assert bank.info() == {"method": "inverted softmax", "beta": bank.beta, "text_bank": 150, "image_bank": 150}
