"""Feature-space bias_score: the embedding applied inside (batched, streamed) equals embedding by hand, then the
float64 brute-force search of test_bias_score."""

import numpy as np
import pytest
import torch

import biasfast
from tests.metrics.test_bias_score import _assert_report_matches, _assert_same_report, _random_problem, brute_force


def random_conv_net(seed: int = 0) -> torch.nn.Module:
    """A small random conv net: 3×H×W images → 24-d rows (the layers of a copy-detection head, untrained)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(24, 24))


def _problem():
    samples_a, samples_b, train_a, train_b, test = _random_problem("l2", 13, 301, (3, 9, 7), n_test=17, seed=4)
    return samples_a, samples_b, train_a, train_b, test


@pytest.mark.parametrize("metric", ["pearson", "l2", "cosine"])
def test_features_equal_embedding_then_search_by_hand(metric, one_thread):
    net = random_conv_net()
    samples_a, samples_b, train_a, train_b, test = _problem()
    with torch.no_grad():
        embedded = [net(x).double() for x in (samples_a, samples_b, train_a, train_b, test)]
    report = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric=metric, test=test, features=net)
    expected = brute_force(*embedded[:4], metric, test=embedded[4])
    _assert_report_matches(report, expected, metric, 13)
    raw = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric=metric, test=test)
    assert raw.own_nn.tolist() != report.own_nn.tolist()  # the embedding changed what was searched


def test_streamed_numpy_chunks_through_the_embedding_give_the_same_report(one_thread):
    net = random_conv_net(1)
    samples_a, samples_b, train_a, train_b, test = _problem()
    whole = biasfast.bias_score(samples_a, samples_b, train_a, train_b, test=test, features=net)
    chunks_a = [train_a[i : i + 40].numpy() for i in range(0, 301, 40)]
    streamed = biasfast.bias_score(samples_a, samples_b, iter(chunks_a), [train_b[:100], train_b[100:]], test=test,
                                   features=net)
    _assert_same_report(streamed.to_dict(), whole.to_dict())
    assert net.training  # the module's mode is restored


def test_features_errors():
    samples_a, samples_b, train_a, train_b, _ = _problem()
    with pytest.raises(TypeError, match="features: expected a callable"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b, features="resnet")
    with pytest.raises(ValueError, match=r"features: expected \(batch, d\) rows for samples_a"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b, features=lambda x: x)
    with pytest.raises(ValueError, match=r"features of train_b \(chunk 1\) \(rows from 0\): contains NaN"):
        biasfast.bias_score(samples_a, samples_b, train_a, [train_b[:5], train_b[5:] * float("nan")],
                            features=lambda x: x.flatten(1))
