"""GAE (P158) against the recursion computed by hand, for terminated and truncated segments."""

import numpy as np
import pytest

from algorithms.common.advantages import gae_advantages, standardize
from algorithms.onpolicy.gae import _real_rows, segment_advantages

GAMMA, LAM = 0.9, 0.5


def test_gae_terminated_segment_by_hand():
    # r = [1, 2, 3], V = [0.5, 1.0, 1.5], terminated: V(s_3) = 0.
    # delta_2 = 3 + 0.9*0    - 1.5 = 1.5
    # delta_1 = 2 + 0.9*1.5  - 1.0 = 2.35
    # delta_0 = 1 + 0.9*1.0  - 0.5 = 1.4
    # A_2 = 1.5; A_1 = 2.35 + 0.45*1.5 = 3.025; A_0 = 1.4 + 0.45*3.025 = 2.76125
    adv = gae_advantages(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 1.5]), 0.0, GAMMA, LAM)
    np.testing.assert_allclose(adv, [2.76125, 3.025, 1.5])


def test_gae_truncated_segment_bootstraps_with_last_value():
    # Same data, truncated with V(s_3) = 2.0: delta_2 = 3 + 1.8 - 1.5 = 3.3
    # A_2 = 3.3; A_1 = 2.35 + 0.45*3.3 = 3.835; A_0 = 1.4 + 0.45*3.835 = 3.12575
    adv = gae_advantages(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 1.5]), 2.0, GAMMA, LAM)
    np.testing.assert_allclose(adv, [3.12575, 3.835, 3.3])


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards, values = np.array([1.0, 1.0, 1.0]), np.array([0.2, 0.1, 0.3])
    adv = gae_advantages(rewards, values, 0.0, 0.9, 1.0)
    returns = np.array([1 + 0.9 + 0.81, 1 + 0.9, 1.0])
    np.testing.assert_allclose(adv, returns - values)


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values = np.array([1.0, 0.0]), np.array([0.5, 0.25])
    adv = gae_advantages(rewards, values, 1.0, 0.9, 0.0)
    np.testing.assert_allclose(adv, [1 + 0.9 * 0.25 - 0.5, 0 + 0.9 * 1.0 - 0.25])


def test_segments_with_phantom_rows_terminated_and_truncated():
    # Two segments as the learner connector sees them: each ends in a phantom row carrying V(s_T).
    # Segment A (terminated): r=[1,2,3], V=[.5,1,1.5], phantom V=9 (ignored: terminal).
    # Segment B (truncated):  r=[1,2,3], V=[.5,1,1.5], phantom V=2 (used as bootstrap).
    values = np.array([0.5, 1.0, 1.5, 9.0, 0.5, 1.0, 1.5, 2.0], dtype=np.float32)
    rewards = np.array([1, 2, 3, 0, 1, 2, 3, 0], dtype=np.float32)
    terminateds = np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    adv, targets = segment_advantages(values, rewards, terminateds, [4, 4], GAMMA, LAM)
    np.testing.assert_allclose(adv, [2.76125, 3.025, 1.5, 0, 3.12575, 3.835, 3.3, 0], rtol=1e-6)
    np.testing.assert_allclose(targets[:3], adv[:3] + values[:3], rtol=1e-6)
    assert _real_rows([4, 4]).tolist() == [True, True, True, False, True, True, True, False]


def test_standardize():
    x = standardize(np.array([1.0, 2.0, 3.0]))
    assert x.mean() == pytest.approx(0.0)
    assert x.std() == pytest.approx(1.0, rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        gae_advantages(np.zeros(3), np.zeros(2), 0.0, 0.9, 0.9)
