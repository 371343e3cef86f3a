"""Calibrated match probabilities (issue 15) on real data: the numpy inference reproduces scikit-learn's
predict_proba, probabilities lie in [0, 1] and rise with the cosine, the calibration round-trips
through a checkpoint and its fingerprint, and a live server attaches them, drops results under
min_probability, says no_confident_match and refuses bad values."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from conftest import build_index

from retrieval.client import RetrievalClient, search_request
from retrieval.embedding.calibration import FEATURES, Calibration, calibrations_of
from retrieval.embedding.checkpoint import load_checkpoint, save_checkpoint
from retrieval.embedding.factory import create_model
from retrieval.embedding.querybank import querybank_of
from retrieval.encoding.bulk import encode_image_files, encode_texts
from retrieval.encoding.datasets import load_caption_dataset
from retrieval.serving.server import ServeConfig, ServerThread
from retrieval.store.reader import IndexVersion
from retrieval.training.calibration import calibrate_model, direction_data, fit_calibrations, fit_pipeline

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def split_vectors(model, preprocess, tokenizer, data, split):
    ds = load_caption_dataset(data, split)
    images, bad = encode_image_files(model, ds.image_paths(), preprocess, workers=0, progress=False)
    assert not bad
    return images, encode_texts(model, tokenizer, ds.captions, progress=False), ds.caption_image


@pytest.fixture(scope="module")
def vectors(flickr_mini, default_model):
    """flickr_mini's dev and test splits encoded by the shipped model."""
    return {split: split_vectors(*default_model, flickr_mini, split) for split in ("dev", "test")}


@pytest.fixture(scope="module")
def calibrated_file(vectors, tmp_path_factory):
    """The shipped heads calibrated on flickr_mini's dev split, written as a checkpoint."""
    model, _, _ = create_model("lite0-minilm")
    model.set_calibration({})
    calibrate_model(model, *vectors["dev"])
    path = tmp_path_factory.mktemp("calibrated") / "calibrated.safetensors"
    save_checkpoint(path, model, compact=True)
    return path, model


def test_numpy_inference_equals_sklearn_predict_proba(vectors, default_model):
    bank = querybank_of(default_model[0])
    for direction in ("t2i", "i2t"):
        queries, cos, bias, labels, center = direction_data(direction, *vectors["test"], bank)
        blank = Calibration(np.zeros(5), np.ones(5), np.zeros(5), 0.0, 10, center)
        x = blank.features(queries, cos, bias).reshape(-1, len(FEATURES))
        pipe = fit_pipeline(x, labels.reshape(-1).astype(int))
        scaler, lr = pipe[0], pipe[-1]
        ours = Calibration(scaler.mean_, scaler.scale_, lr.coef_[0], float(lr.intercept_[0]), 10, center)
        np.testing.assert_allclose(ours.probability(x), pipe.predict_proba(x)[:, 1], rtol=0, atol=1e-12)
        # and through the packed form the model stores
        np.testing.assert_array_equal(Calibration.unpack(ours.pack()).probability(x), ours.probability(x))


def test_probabilities_lie_in_0_1_and_rise_with_the_cosine(vectors, default_model):
    """For each test query's candidates: every probability is in [0, 1]; and moving the cosine over
    [-1, 1] while the bias, the margin, the angle to the gallery's mean and the rank stay fixed
    never lowers the probability (it rises strictly: the fitted coefficient of the cosine is positive)."""
    bank = querybank_of(default_model[0])
    calibrations, _ = fit_calibrations(*vectors["dev"], bank)
    grid = np.linspace(-1, 1, 41)
    for direction, cal in calibrations.items():
        queries, cos, bias, _, _ = direction_data(direction, *vectors["test"], bank)
        p = cal.match_probability(queries, cos, bias)
        assert p.shape == cos.shape and np.all((p >= 0) & (p <= 1))
        assert cal.coef[FEATURES.index("cosine")] > 0
        x = cal.features(queries, cos, bias).reshape(-1, 1, len(FEATURES)).repeat(len(grid), axis=1)
        x[:, :, FEATURES.index("cosine")] = grid
        assert np.all(np.diff(cal.probability(x), axis=1) > 0)


def test_calibration_round_trips_through_the_checkpoint_and_fingerprint(calibrated_file, default_model):
    path, model = calibrated_file
    loaded, _, _ = create_model(str(path))
    assert set(loaded.calibration()) == {"t2i", "i2t"}
    for direction, packed in model.calibration().items():
        assert loaded.calibration()[direction].dtype == torch.float64
        assert torch.equal(loaded.calibration()[direction], packed)  # full precision in a float16 file
    assert loaded.fingerprint() == model.fingerprint() == load_checkpoint(path)["fingerprint"]
    # the heads are the shipped ones; only the calibration (in the fingerprint) differs
    shipped = default_model[0]
    uncalibrated = {k: v for k, v in shipped.head_state_dict().items() if not k.startswith("calibration_")}
    for key, value in uncalibrated.items():
        assert torch.equal(loaded.head_state_dict()[key], value), key
    other = {d: c.pack() for d, c in calibrations_of(loaded).items()}
    other["t2i"] = other["t2i"] + np.r_[0.0, 1e-9, np.zeros(len(other["t2i"]) - 2)]
    loaded.set_calibration({d: torch.from_numpy(v) for d, v in other.items()})
    assert loaded.fingerprint() != model.fingerprint()


# -- a live server over a calibrated model -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(calibrated_file, flickr_mini, tmp_path_factory):

    root = tmp_path_factory.mktemp("calibrated-server") / "index"
    build_index(root, "--dataset", str(flickr_mini), "--split", "test", "--model", str(calibrated_file[0]))
    srv = ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1)).start()
    yield srv, root
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server[0].address, timeout=60) as c:
        yield c


QUERY = "A dog runs through the grass ."


def test_cross_modal_results_carry_the_models_probabilities(
    client, server, calibrated_file, flickr_mini, default_model
):
    _, root = server
    model = calibrated_file[1]
    assert client.index_info().calibrated
    hits = client.search_text(QUERY, k=5)
    assert len(hits) == 5 and all(0 <= h.match_probability <= 1 for h in hits)
    # what the server says is the calibrator applied to the search's top candidates, as computed here
    cal = calibrations_of(model)["t2i"]
    q = model.encode_text(default_model[2]([QUERY])).numpy()
    version = IndexVersion.open(root)
    try:
        cos, ids = version.search("image", q, cal.top_k, cross_modal=True)
        bias = version.bias("image", ids[0])[None, :]
    finally:
        version.close()
    assert [h.id for h in hits] == ids[0, :5].tolist()
    np.testing.assert_allclose(
        [h.match_probability for h in hits], cal.match_probability(q, cos, bias)[0, :5], rtol=1e-6
    )
    image = (flickr_mini / "images" / (flickr_mini / "splits" / "test.txt").read_text().split()[0]).read_bytes()
    captions = client.search_image(image, k=3)
    assert all(0 <= h.match_probability <= 1 for h in captions)
    # same-modal searches have none
    assert all(h.match_probability is None for h in client.search_text(QUERY, k=3, target="text"))


def test_min_probability_drops_results_and_says_no_confident_match(client):
    plain = client.search_with_info(search_request(text=QUERY, k=8))
    assert not plain.no_confident_match
    probs = [h.match_probability for h in plain.hits]
    threshold = float(np.median(probs))
    kept = client.search_with_info(search_request(text=QUERY, k=8, min_probability=threshold))
    assert [h.id for h in kept.hits] == [h.id for h in plain.hits if h.match_probability >= threshold]
    assert kept.hits and not kept.no_confident_match
    none = client.search_with_info(search_request(text=QUERY, k=8, min_probability=1.0))
    assert none.hits == [] and none.no_confident_match
    everything = client.search_with_info(search_request(text=QUERY, k=8, min_probability=0.0))
    assert [h.id for h in everything.hits] == [h.id for h in plain.hits] and not everything.no_confident_match


@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan, math.inf])
def test_min_probability_outside_0_1_is_invalid_argument(client, value):
    with pytest.raises(grpc.RpcError) as e:
        client.search_text(QUERY, k=3, min_probability=value)
    assert e.value.code() == INVALID and "min_probability" in e.value.details()


def test_min_probability_without_probabilities_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as e:
        client.search_text(QUERY, k=3, target="text", min_probability=0.5)
    assert e.value.code() == INVALID and "calibrated" in e.value.details()


def test_query_cli_prints_probabilities_and_no_confident_match(server, capsys):
    import json

    from retrieval.cli import main

    address = server[0].address
    assert main(["query", "--address", address, "--text", QUERY, "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 and all(0 <= r["match_probability"] <= 1 for r in out)
    assert main(["query", "--address", address, "--text", QUERY, "--k", "3", "--min-probability", "1"]) == 0
    assert capsys.readouterr().out.startswith("(no confident match")
    assert main(["query", "--address", address, "--text", QUERY, "--min-probability", "2"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
