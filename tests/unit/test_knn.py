"""The per-client k-NN detector (Chen, Carlini & Wagner): calibrated on clean embeddings, it
flags an attack's clustered queries and leaves held-out honest streams alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bastion.gateway.defence import knn
from bastion.gateway.defence.jit import JIT
from bastion.gateway.defence.knn import FILENAME, Histories, KnnSpec, calibrate, mean_knn_distance
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier


@pytest.fixture(scope="module")
def embedded() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    net = ServedClassifier(load_digits()).eval()
    out = {}
    for split in ("calibration", "test"):
        with torch.no_grad():
            _, probs, embedding = net.forward_embedded(
                torch.from_numpy(to_float(load_split(split)[0]))
            )
        out[split] = (embedding.numpy(), probs.argmax(1).numpy())
    return out


def test_mean_knn_distance_against_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    history, queries = rng.normal(size=(30, 8)), rng.normal(size=(4, 8))
    got = mean_knn_distance(history, queries, 5)
    for q, value in zip(queries, got, strict=True):
        distances = sorted(float(np.linalg.norm(h - q)) for h in history)
        assert value == pytest.approx(np.mean(distances[:5]), rel=1e-4)
    assert np.isinf(mean_knn_distance(history[:0], queries, 5)).all()


def test_held_out_single_class_streams_stay_near_the_calibrated_rate(embedded) -> None:
    spec = calibrate(*embedded["calibration"], fpr=0.001)
    embeddings, classes = embedded["test"]
    histories, flags = Histories(), []
    for label in range(10):  # the hardest honest clients: each sends one class only
        members = embeddings[classes == label]
        flags.extend(histories.near(f"c{label}", "m", spec, members).tolist())
    assert np.mean(flags) <= 0.01, np.mean(flags)


def test_an_attacks_clustered_queries_are_near(embedded) -> None:
    spec = calibrate(*embedded["calibration"], fpr=0.001)
    net = ServedClassifier(load_digits()).eval()
    seed = to_float(load_split("test")[0][:1])
    rng = np.random.default_rng(0)
    walk = np.clip(seed + rng.normal(0, 0.05, size=(40, 1, 28, 28)), 0, 1).astype(np.float32)
    with torch.no_grad():
        _, _, embedding = net.forward_embedded(torch.from_numpy(walk))
    flags = Histories().near("mallory", "m", spec, embedding.numpy())
    assert not flags[: spec.k].any()  # no verdict before k earlier queries
    assert flags[spec.k :].all()


def test_histories_are_bounded_and_forgotten() -> None:
    spec = KnnSpec(k=2, history=4, threshold=1.0, fpr=0.001, samples=1000)
    histories = Histories(clients=2)
    for client in "abc":
        histories.near(client, "m", spec, np.zeros((6, 3), np.float32))
    assert [key[0] for key in histories._rings] == ["b", "c"]
    histories.forget("c")
    assert [key[0] for key in histories._rings] == ["b"]
    assert histories.memory_bytes(128, 100) == (2 * 100 + 2048) * 128 * 4


def test_the_spec_round_trips_and_a_damaged_file_is_refused(tmp_path) -> None:
    spec = KnnSpec(k=10, history=100, threshold=6.4, fpr=0.001, samples=4000)
    assert KnnSpec.load(spec.save(tmp_path).parent) == spec
    (tmp_path / FILENAME).write_text(json.dumps({"k": 10}))
    with pytest.raises(ValueError):
        KnnSpec.load(tmp_path)
    assert KnnSpec.load(tmp_path / "missing") is None


def test_too_little_data_for_the_rate_is_refused(embedded) -> None:
    embeddings, classes = embedded["calibration"]
    with pytest.raises(ValueError):
        calibrate(embeddings[:200], classes[:200], fpr=0.0001)


@pytest.mark.parametrize("fast", [False, True])
def test_one_querys_loop_equals_the_batched_numpy_distance(fast: bool) -> None:
    if fast and not JIT:
        pytest.skip("numba is not installed (the 'fast' extra)")
    rng = np.random.default_rng(2)
    ring = rng.normal(size=(100, 128)).astype(np.float32)
    query = rng.normal(size=128).astype(np.float32)
    loop = knn.FAST_NEAREST_MEAN if fast else knn.nearest_mean
    for filled, k in ((100, 5), (7, 5), (3, 5)):
        expected = mean_knn_distance(ring[:filled], query[None], k)[0]
        assert loop(ring, filled, query, k) == pytest.approx(expected, rel=1e-5)


def test_a_young_identitys_query_next_to_another_clients_is_linked_to_it(embedded) -> None:
    """A rotating attacker's fresh identity: its own history says nothing yet, but its query
    sits next to its previous identity's in embedding space; a new honest client's digit does
    not sit next to anyone's."""
    spec = calibrate(*embedded["calibration"], fpr=0.001)
    assert spec.link_threshold is not None and spec.link_threshold < spec.threshold
    net = ServedClassifier(load_digits()).eval()
    seed = to_float(load_split("test")[0][:1])
    rng = np.random.default_rng(1)
    walk = np.clip(seed + rng.normal(0, 0.02, size=(4, 1, 28, 28)), 0, 1).astype(np.float32)
    with torch.no_grad():
        _, _, steps = net.forward_embedded(torch.from_numpy(walk))
    histories = Histories()
    honest = embedded["test"][0][100:300]
    for i, vector in enumerate(honest):  # background traffic from established clients
        histories.link(f"honest-{i % 4}", "m", spec, vector)
    for vector in steps[:3].numpy():
        assert histories.link("sybil-0", "m", spec, vector) in (None, "sybil-0")
        histories.near("sybil-0", "m", spec, vector[None])
    assert histories.link("sybil-1", "m", spec, steps[3].numpy()) == "sybil-0"
    assert histories.link("sybil-1", "other-model", spec, steps[3].numpy()) is None
    assert histories.link("newcomer", "m", spec, embedded["test"][0][500]) is None


def test_a_young_identitys_query_continuing_a_suspect_campaigns_history_joins_it(embedded) -> None:
    """A fresh identity's query too far from any one query to link by itself, whose k nearest
    queries of a throttled campaign (several identities) average below the k-NN threshold,
    continues that campaign; the same query beside a campaign nobody suspects links nowhere,
    and honest digits of other classes link nowhere either."""
    spec = calibrate(*embedded["calibration"], fpr=0.001)
    assert spec.link_threshold is not None
    vectors, classes = embedded["test"]
    query = vectors[0]
    rng = np.random.default_rng(2)
    directions = rng.normal(size=(8, query.shape[0])).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # the campaign's queries around this one: the nearest too far to link alone, the k nearest
    # (3.5 .. 5.3 when the link is 3.3 and the k-NN threshold 5.5) close enough on average
    radii = spec.link_threshold + np.linspace(
        0.25, 0.75 * (spec.threshold - spec.link_threshold), 8
    )
    campaign = query + radii[:, None].astype(np.float32) * directions
    assert radii[: spec.k].mean() < spec.threshold
    others = vectors[classes != classes[0]]

    def fill(name: str) -> Histories:
        histories = Histories()
        for i, vector in enumerate(others[:200]):  # established honest clients
            histories.link(f"honest-{i % 4}", "m", spec, vector)
        for i, vector in enumerate(campaign):
            histories.link(f"{name}-{i // 3}", "m", spec, vector)
        return histories

    def suspect(client: str) -> str | None:
        return "attack" if client.startswith("attack-") else None

    assert fill("attack").link("fresh", "m", spec, query) is None  # alone it links nowhere
    assert fill("attack").link("fresh", "m", spec, query, suspect) == "attack-0"
    assert fill("quiet").link("fresh", "m", spec, query, suspect) is None
    histories = fill("attack")
    linked = [
        histories.link(f"new-{i}", "m", spec, v, suspect) for i, v in enumerate(others[200:400])
    ]
    assert linked == [None] * 200
