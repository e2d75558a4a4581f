"""The sampler's logit bias (OpenAI's logit_bias): -100 bans a token at any temperature, +100 all but forces it,
a bias in between shifts the odds; bad biases are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from ondevice.errors import OndeviceError
from ondevice.runtime.sampling import Sampler, SamplingParams, logit_bias_pairs

LOGITS = np.array([3.0, 2.5, 2.0, -1.0, 0.5], dtype=np.float32)


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(LOGITS, []) for _ in range(n)]


def test_a_banned_token_is_never_sampled_even_when_it_is_the_best() -> None:
    loose = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=1)
    assert 0 in draws(SamplingParams(temperature=2.0, **loose))
    assert 0 not in draws(SamplingParams(temperature=2.0, logit_bias=((0, -100.0),), **loose))
    assert Sampler(SamplingParams(temperature=0, logit_bias=((0, -100.0),))).sample(LOGITS, []) == 1


def test_a_plus_100_bias_wins_and_a_small_one_shifts_the_odds() -> None:
    assert set(draws(SamplingParams(temperature=1.0, seed=2, logit_bias=((3, 100.0),)))) == {3}
    loose = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=3)
    before = draws(SamplingParams(**loose)).count(4)
    after = draws(SamplingParams(logit_bias=((4, 2.0),), **loose)).count(4)
    assert after > 2 * before


def test_the_logits_given_are_not_changed() -> None:
    logits = LOGITS.copy()
    Sampler(SamplingParams(temperature=0, logit_bias=((0, -100.0), (1, 5.0)))).sample(logits, [])
    assert np.array_equal(logits, LOGITS)


@pytest.mark.parametrize(("bias", "fragment"), [
    ({"7": 1.0}, "not a token id of this model"), ({-1: 1.0}, "not a token id"), ({"a": 1.0}, "not a token id"),
    ({1: 150.0}, "in [-100, 100]"), ({1: float("nan")}, "in [-100, 100]"), ({1: "high"}, "in [-100, 100]"),
    ([1], "mapping")])
def test_bad_biases_are_one_line_errors(bias, fragment: str) -> None:
    with pytest.raises(OndeviceError, match=None) as info:
        SamplingParams(logit_bias=logit_bias_pairs(bias, vocab_size=5)).validate()
    assert fragment in str(info.value) and "\n" not in str(info.value)
