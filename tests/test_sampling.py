"""nanoforge.sampling: picking the next token from logits.

top-k keeps exactly k, top-p the smallest set reaching p; top_k=1 and temperature 0 are
greedy; a seeded generator gives the same samples, each row its own; bad arguments are
UserErrors.
"""

import pytest
import torch

from nanoforge.errors import UserError
from nanoforge.sampling import check_sampling_args, filter_top_k, filter_top_p, sample_next


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])
    kept = torch.isfinite(filter_top_k(logits, 2))
    assert kept.sum().item() == 2
    assert kept[0, 1:4].sum().item() == 2  # two of the tied maxima, nothing else


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 1.0)).all()
    # order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(filter_top_p(logits[:, perm], 0.8)).tolist() == [
        [False, True, False, True]
    ]


def test_top_k_1_and_temperature_0_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))


def test_same_seed_same_samples_and_rows_independent():
    logits = torch.zeros(8, 30)  # uniform
    a = sample_next(logits, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 1  # each row draws its own token


def test_sampling_respects_filters():
    logits = torch.tensor([[0.0, 0.1, 0.2, 5.0, 5.0]]).repeat(200, 1)
    out = sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) <= {3, 4} and len(set(out.tolist())) == 2


@pytest.mark.parametrize(
    "args",
    [
        (0, 1.0, None, None),
        (10, -0.1, None, None),
        (10, 1.0, 0, None),
        (10, 1.0, None, 0.0),
        (10, 1.0, None, 1.5),
        (1.5, 1.0, None, None),
        (10, float("nan"), None, None),
        (10, float("inf"), None, None),
        (10, 1.0, 2.5, None),
    ],
)
def test_bad_sampling_args(args):
    with pytest.raises(UserError):
        check_sampling_args(*args)
    check_sampling_args(10, 0.8, 40, 0.95)  # a good set passes


def test_non_finite_logits_are_an_error_not_text():
    logits = torch.zeros(2, 5)
    logits[1, 3] = float("nan")
    for temperature in (0.0, 1.0):  # greedy would pick the NaN's index without the check
        with pytest.raises(UserError, match="not finite .* earlier checkpoint"):
            sample_next(logits, temperature)


def test_a_temperature_that_overflows_the_logits_is_one_line():
    logits = torch.tensor([[1.0, 50.0, -3.0]])
    with pytest.raises(UserError, match="temperature=1e-40 is so small .* temperature=0"):
        sample_next(logits, 1e-40)
