"""Reward models (issue 6): the Bradley-Terry RM (BT-RM), the goal-conditioned RM (P122) and MaxMin-RLHF (P044).

Losses on hand-computed batches, the reward head on padded batches, hard EM on a synthetic mixture whose
answer is known, the user population, one real RLlib Learner update, and smoke runs through Ray and the Redis
preference queue. The learning checks are `rlfleet verify --algo reward_model | goal_rm | maxmin_rlhf`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.common.bradley_terry import (
    bayes_label_accuracy,
    bradley_terry_loss,
    em_reward_mixture,
    pairwise_accuracy,
    split_by_fit,
)
from algorithms.common.sequence import pad_pairs
from algorithms.preference import goal_rm, maxmin_rlhf, reward_model
from algorithms.preference.base import TINY_LM, learner_batch
from algorithms.preference.reward_head import RewardModel, final_hidden_states, last_token_index, reward_scores
from algorithms.preference.rm_loop import train_reward_models
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.text_tasks import PAD_ID, ReverseDigits
from envs.text_user_groups import UserGroup, UserPopulation, majority_minority
from services.preferences import Label, LabelledPair, Pair, PreferenceQueue

SMOKE = {"pairs_per_step": 8, "sft_steps": 5, "rm_epochs": 1}
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_bradley_terry_loss_by_hand() -> None:
    # r_w - r_l = 2 - 1 = 1:  -log sigmoid(1)  = log(1 + e^-1) = 0.313262
    # r_w - r_l = 0 - 1 = -1: -log sigmoid(-1) = log(1 + e)    = 1.313262
    # r_w = r_l:              -log sigmoid(0)  = log 2          = 0.693147
    rw = torch.tensor([2.0, 0.0, 5.0], requires_grad=True)
    loss = bradley_terry_loss(rw, torch.tensor([1.0, 1.0, 5.0]))
    assert torch.allclose(loss, torch.tensor([0.313262, 1.313262, 0.693147]), atol=1e-6)
    # d/d r_w = -sigmoid(-(r_w - r_l)): -0.268941, -0.731059, -0.5 (raise the chosen one, more when it is behind)
    loss.sum().backward()
    assert torch.allclose(rw.grad, torch.tensor([-(1 - sig(1)), -(1 - sig(-1)), -0.5]), atol=1e-6)


def test_accuracies_by_hand() -> None:
    # hidden scores (3,1), (2,2) tie: left out, (0,1), (1,3); model orders 1st right, 3rd wrong, 4th tied (half)
    acc, se, n = pairwise_accuracy(np.array([5.0, 1.0, 2.0, 0.5]), np.array([1.0, 0.0, 1.0, 0.5]),
                                   np.array([3, 2, 0, 1]), np.array([1, 2, 1, 3]))
    assert n == 3 and acc == pytest.approx((1 + 0 + 0.5) / 3)
    # hits (1, 0, 0.5): sample std = 0.5, SE = 0.5 / sqrt(3)
    assert se == pytest.approx(0.5 / math.sqrt(3))
    # P(first) = 0.9 and 0.2: the best guesses are right 0.9 and 0.8 of the time
    assert bayes_label_accuracy(np.array([0.9, 0.2])) == pytest.approx(0.85)


def test_reward_head_reads_the_last_real_token_whatever_the_padding() -> None:
    torch.manual_seed(0)
    model = RewardModel(TINY_LM)
    torch.nn.init.normal_(model.head.weight)  # zero at construction: make the head say something
    model.eval()
    prompts, responses = [[1, 5, 6, 3], [1, 7, 3]], [[6, 5, 2], [9, 9, 9, 9, 2]]
    right = pad_pairs(prompts, responses, PAD_ID, side="right")
    left = pad_pairs(prompts, responses, PAD_ID, side="left")
    assert last_token_index(right["attention_mask"]).tolist() == [6, 7]
    assert last_token_index(left["attention_mask"]).tolist() == [7, 7]
    with torch.no_grad():
        r_right, r_left = reward_scores(model, right), reward_scores(model, left)
        # by hand: the head on the final hidden state of each row's last token
        hidden = final_hidden_states(model, right)
        by_hand = torch.stack([model.head(hidden[0, 6]), model.head(hidden[1, 7])]).squeeze(-1)
        assert torch.allclose(r_right, by_hand, atol=1e-6)
        assert torch.allclose(r_right, r_left, atol=1e-5)
        # what sits in the padding does not matter
        right["input_ids"][0, 7] = 11
        assert torch.allclose(reward_scores(model, right), r_right, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        RewardModel()


def test_goal_contrastive_loss_by_hand() -> None:
    # pair 0: Q+ = cos([1,0],[2,0]) = 1, Q- = cos([1,0],[0,3]) = 0:
    #   -log sig(1) - log(1 - sig(0)) = 0.313262 + 0.693147 = 1.006409
    # pair 1: Q+ = cos([1,1],[1,-1]) = 0, Q- = cos([0,1],[0,-1]) = -1:
    #   -log sig(0) - log(1 - sig(-1)) = 0.693147 + 0.313262 = 1.006409 ... and -log sig(1) = 0.313262
    out = goal_rm.goal_contrastive_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, -1.0]]),
                                        torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [0.0, -1.0]]))
    assert torch.allclose(out["q_pos"], torch.tensor([1.0, 0.0]), atol=1e-6)
    assert torch.allclose(out["q_neg"], torch.tensor([0.0, -1.0]), atol=1e-6)
    assert torch.allclose(out["loss"], torch.tensor([0.313262 + 0.693147, 0.693147 + 0.313262]), atol=1e-5)
    # a positive goal aligned with its source and a negative one opposite: the minimum, 2 * 0.313262
    best = goal_rm.goal_contrastive_loss(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2), -torch.ones(1, 2))
    assert best["loss"].item() == pytest.approx(2 * 0.313262, abs=1e-5)


def test_goal_triples_stay_on_their_responses() -> None:
    g = torch.Generator().manual_seed(0)
    t = 10
    chosen = torch.zeros(200, t, dtype=torch.bool)
    rejected = torch.zeros(200, t, dtype=torch.bool)
    chosen[:, 5:9] = True  # a 4-token preferred response
    chosen[0, 6:9] = False  # row 0: one token only, no future state
    rejected[:, 5:7] = True
    idx = goal_rm.goal_triples(chosen, rejected, g)
    assert idx["ok"].tolist() == [False] + [True] * 199
    ok = idx["ok"]
    assert bool((idx["src_pos"][ok] >= 5).all() and (idx["src_pos"][ok] <= 7).all())  # never the last token
    assert bool((idx["goal_pos"][ok] > idx["src_pos"][ok]).all() and (idx["goal_pos"][ok] <= 8).all())
    assert bool((idx["src_neg"] >= 5).all() and (idx["src_neg"] <= 8).all())
    assert set(idx["goal_neg"].tolist()) == {5, 6}  # uniform over the rejected response: both show up


def _linear_fit(features: dict, weights: dict):
    """M-step of a linear BT model r(y) = w . phi(y): Newton's method on the BT log-likelihood (logistic
    regression of "first wins" on phi(y_w) - phi(y_l), no intercept), from zero."""

    def fit(u: int, members: list) -> None:
        d = np.concatenate([features[h] for h in members])
        w = np.zeros(d.shape[1])
        for _ in range(25):
            p = 1 / (1 + np.exp(-(d @ w)))
            grad = d.T @ (1 - p)  # gradient of sum log sigmoid(d w)
            hess = (d * (p * (1 - p))[:, None]).T @ d + 1e-6 * np.eye(len(w))
            w = w + np.linalg.solve(hess, grad)
        weights[u] = w

    def loglik(u: int) -> dict:
        return {h: float(-np.logaddexp(0.0, -(d @ weights[u])).sum()) for h, d in features.items()}

    return fit, loglik


def test_em_recovers_a_known_mixture_of_two_linear_reward_models() -> None:
    """8 users of hidden weights (3, -3) and 3 users of (-3, 3), 40 labelled pairs each; phi(y_w) - phi(y_l) rows.
    Hard EM from the pooled-model split must put every user with its own group and converge."""
    rng = np.random.default_rng(0)
    truth = {f"u{i}": 0 if i < 8 else 1 for i in range(11)}
    true_w = {0: np.array([3.0, -3.0]), 1: np.array([-3.0, 3.0])}
    features = {}
    for h, g in truth.items():
        d = rng.normal(size=(40, 2))
        first_wins = rng.random(40) < 1 / (1 + np.exp(-(d @ true_w[g])))
        features[h] = np.where(first_wins[:, None], d, -d)  # chosen minus rejected
    weights: dict = {}
    fit, loglik = _linear_fit(features, weights)
    fit(0, list(features))  # the pooled model: mostly the majority's weights
    pooled = loglik(0)
    init = split_by_fit({h: pooled[h] / 40 for h in features}, 2)
    assert all(init[h] == 1 for h in ("u8", "u9", "u10"))  # the users the pooled model explains worst
    result = em_reward_mixture(list(features), 2, init, fit, loglik, max_iters=10)
    assert result.converged
    assert result.assignment == truth
    assert np.sign(weights[0]).tolist() == [1, -1] and np.sign(weights[1]).tolist() == [-1, 1]
    # k-means on the per-user fit, not equal-size cuts: two tight groups of 4 and 1 users stay 4 and 1
    assert split_by_fit({"a": -0.30, "b": -0.31, "c": -0.32, "d": -0.35, "e": -0.90}, 2) == {
        "a": 0, "b": 0, "c": 0, "d": 0, "e": 1}
    with pytest.raises(ValueError, match="assigns no cluster"):
        em_reward_mixture(["a", "b"], 2, {"a": 0}, fit, loglik)


def test_maxmin_pieces_by_hand() -> None:
    # R = r - 0.5 (log pi - log pi_ref): 2 - 0.5 (-1 - -2) = 1.5; 0 - 0.5 (-3 - -1) = 1.0
    total = maxmin_rlhf.kl_regularised_rewards(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, -3.0]),
                                               torch.tensor([-2.0, -1.0]), 0.5)
    assert torch.allclose(total, torch.tensor([1.5, 1.0]))
    # group means: u0 = (1 + 3) / 2 = 2, u1 = (0 + 1) / 2 = 0.5 -> the worst-off group is 1
    assert maxmin_rlhf.maxmin_group(torch.tensor([[1.0, 3.0], [0.0, 1.0]])) == 1
    # -mean(A logp) = -(2 * -1 + -1 * -2) / 2 = 0; d/d logp = -A / 2
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = maxmin_rlhf.policy_gradient_loss(logp, torch.tensor([2.0, -1.0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0) and logp.grad.tolist() == [-1.0, 0.5]


def test_user_groups_score_and_label_by_their_own_preference() -> None:
    task = ReverseDigits()
    pop = majority_minority(task, majority=3, minority=2, beta=2.0, seed=0)
    assert pop.users == [f"user-{i}" for i in range(5)] and [pop.group_of[u] for u in pop.users] == [0, 0, 0, 1, 1]
    # "123>": reverse wants "321"; even counts 2s, 4s, ... ; an extra character costs 1 in both
    assert [pop.score(0, "123>", r) for r in ("321", "222", "3210")] == [3, 1, 2]
    assert [pop.score(1, "123>", r) for r in ("321", "222", "3210")] == [1, 3, 0]
    # user-0 (reverse) vs user-4 (even) on "321" vs "222": P(first) = sig(2 * 2) and sig(2 * -2)
    assert pop.prob_first("user-0", "123>", "321", "222") == pytest.approx(sig(4))
    assert pop.prob_first("user-4", "123>", "321", "222") == pytest.approx(sig(-4))
    votes = [pop.label("user-4", "123>", "321", "222") for _ in range(1000)]
    assert votes.count(1) > 950
    with pytest.raises(ValueError, match="unknown user group"):
        UserGroup("odd", 3)
    with pytest.raises(ValueError, match="beta"):
        UserPopulation(task, (UserGroup("even", 1),), beta=0.0)


def _labelled(prompt: str, first: str, second: str, preferred, i: int, judge: str = "test") -> LabelledPair:
    pair = Pair(prompt=prompt, responses=(first, second), policy_version=0, pair_id=f"t-{i}")
    return LabelledPair(entry_id=f"0-{i}", pair=pair, label=Label(preferred, judge, 0.0), epoch=0)


@pytest.mark.parametrize("rule", [reward_model.RULE, goal_rm.RULE])
def test_one_reward_model_update_through_a_learner_group(rule) -> None:
    """A real RLlib TorchLearner: the first BT loss is log 2 (the head starts at zero), ties are left out, and
    repeated updates order the chosen responses above the rejected ones."""
    config = rule.config_class().learners(num_learners=0).debugging(seed=0)
    config.validate()
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    try:
        task = ReverseDigits()
        pairs = [_labelled(f"{i}{i}7>", f"7{i}{i}", f"{(i + 1) % 10}{i}", 0, i) for i in range(6)]
        pairs.append(_labelled("555>", "555", "5", "tie", 9))
        batch = learner_batch(task, pairs)
        peek = lambda v: float(v.peek() if hasattr(v, "peek") else v)  # noqa: E731
        stats = (lambda r: (r[0] if isinstance(r, list) else r)["default_policy"])(group.update(batch=batch))
        assert peek(stats["bt_loss"]) == pytest.approx(math.log(2), rel=1e-5)
        assert peek(stats["pairs"]) == 6.0
        if rule is goal_rm.RULE:
            assert math.isfinite(peek(stats["goal_loss"])) and peek(stats["rm_loss"]) > peek(stats["bt_loss"])
        for _ in range(15):
            stats = (lambda r: (r[0] if isinstance(r, list) else r)["default_policy"])(group.update(batch=batch))
        assert peek(stats["train_accuracy"]) == 1.0 and peek(stats["bt_loss"]) < 0.3
    finally:
        group.shutdown()


def test_bad_options_are_refused() -> None:
    config = reward_model.RULE.config_class()
    config.pair_source = "policy"
    with pytest.raises(ValueError, match="pair_source must be 'reference'"):
        config.validate()
    config = goal_rm.RULE.config_class()
    config.goal_weight = -1.0
    with pytest.raises(ValueError, match="goal_weight"):
        config.validate()
    config = maxmin_rlhf.RULE.config_class()
    config.samples_per_prompt = 1
    with pytest.raises(ValueError, match="samples_per_prompt"):
        config.validate()
    with pytest.raises(ValueError, match="unknown option 'rm_epoch'"):
        train_reward_models(reward_model.RULE, steps=1, overrides={"rm_epoch": 2})


@pytest.mark.parametrize("rule", [reward_model.RULE, goal_rm.RULE])
def test_smoke_through_ray_and_the_redis_queue(rule, ray_session, rclient, namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=64)
    variants = {goal_rm.PLAIN_VARIANT: {"goal_weight": 0.0}} if rule is goal_rm.RULE else None
    run = train_reward_models(rule, variants, steps=2, seed=0, overrides=SMOKE, queue=queue, eval_prompts=32)
    # every pair was generated, labelled by the judge, learned from by every RM, and acked exactly once
    assert run.pairs_acked == 16 and len(queue.used(queue.epoch)) == 16
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    info = queue.info()
    assert info["added"] == 16 and info["labelled"] == 16 and info["acked"] == 16
    assert set(run.history) == {rule.name} | set(variants or {})
    for name, history in run.history.items():
        assert len(history) == 2 and history[0]["bt_loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert 0.0 <= run.evaluation[name]["accuracy"] <= 1.0
    assert any(float(p.detach().abs().sum()) > 0 for p in run.models[rule.name].head.parameters())  # the head learned


def test_maxmin_smoke_through_ray_and_the_redis_queue(ray_session, rclient, namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=64)
    rule = maxmin_rlhf.RULE
    result = maxmin_rlhf.train_maxmin(rule, steps=2, seed=0, overrides=rule.smoke_overrides, queue=queue,
                                      eval_prompts=16)
    assert result["pairs_acked"] == 16 and queue.info()["acked"] == 16
    # the users labelled through the queue under their own ids, and EM assigned each of them a cluster
    assert set(result["assignment"]) <= {"user-0", "user-1", "user-2"}
    assert sum(result["cluster_sizes"]) == len(result["assignment"]) and result["em_iterations"] == 1
    for name in ("maxmin", "single"):
        assert len(result["history"][f"policy_{name}"]) == 1
        assert 0.0 <= result[f"{name}_min_group_win"] <= 1.0
    assert result["history"]["policy_maxmin"][0]["group"] in (0.0, 1.0)
