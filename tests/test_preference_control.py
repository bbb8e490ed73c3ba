"""Preference rules on a control task (issue 6): the losses by hand, the segment table (schema'd Redis records read
back by id, hidden fields refused to learners), the scripted teacher, and a smoke run of every rule through a Ray
collector actor, the Redis segment table and the Redis preference queue. The learning checks (the env's true
return after learning from preferences only) are `rlfleet verify --algo <rule>` / the slow test at the end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.preference import cpl, parl, regret_pref, spo, vpl
from algorithms.preference.control_loop import bradley_terry_choices
from algorithms.preference.cpl import cpl_loss
from algorithms.preference.regret_pref import preference_nll, segment_scores, value_iteration
from algorithms.preference.segments import SegmentTable, parse_segment_id, segment_id
from algorithms.preference.parl import parl_upper_loss, soft_value_iteration
from algorithms.preference.spo import spo_win_rates, terminal_rewards
from algorithms.preference.vpl import VPLModel, gaussian_kl, vpl_loss
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.pref_reach import PrefReachEnv, cell_index, optimal_q, reward_table, transition_table
from services.preferences import PreferenceQueue
from services.replay import ReplayError, SchemaError

RULES = [cpl.RULE, spo.RULE, regret_pref.RULE, vpl.RULE, parl.RULE]
MODULES = {"cpl": cpl, "spo": spo, "regret_pref": regret_pref, "vpl": vpl, "parl": parl}


# -- losses by hand ------------------------------------------------------------------------------------------------

def test_cpl_loss_by_hand() -> None:
    chosen = torch.tensor([[-1.0, -2.0]])
    rejected = torch.tensor([[-2.0, -4.0]])
    terms = cpl_loss(chosen, rejected, alpha=0.5, bias=0.5, gamma=0.5, bc_coeff=0.1)
    # S+ = 0.5 * (-1 + 0.5 * -2) = -1;  S- = 0.5 * (-2 + 0.5 * -4) = -2
    # logit = S+ - lambda S- = -1 - 0.5 * -2 = 0  ->  contrastive = -log sigmoid(0) = log 2
    # bc = -(1/2)(-1 - 2) = 1.5  ->  loss = log 2 + 0.1 * 1.5
    assert terms["contrastive"].item() == pytest.approx(math.log(2))
    assert terms["bc"].item() == pytest.approx(1.5)
    assert terms["loss"].item() == pytest.approx(math.log(2) + 0.15)
    assert terms["accuracy"].item() == 1.0  # S+ > S-
    # lambda = 1 (plain CPL): logit = -1 + 2 = 1 -> log(1 + e^-1) = 0.313262
    plain = cpl_loss(chosen, rejected, alpha=0.5, bias=1.0, gamma=0.5, bc_coeff=0.0)
    assert plain["loss"].item() == pytest.approx(math.log1p(math.exp(-1.0)))
    # swapping the preference raises the loss: logit = -2 + 1 = -1 -> log(1 + e) = 1.313262
    swapped = cpl_loss(rejected, chosen, alpha=0.5, bias=1.0, gamma=0.5, bc_coeff=0.0)
    assert swapped["loss"].item() == pytest.approx(math.log1p(math.e))
    assert swapped["accuracy"].item() == 0.0


def test_spo_win_rates_by_hand() -> None:
    # 0 beats 1, 0 ties 2, 2 beats 1: wins 0: 1 + 0.5, 1: 0, 2: 0.5 + 1; / (K - 1) = 2
    rates = spo_win_rates(3, [(0, 1, 1.0), (0, 2, 0.5), (1, 2, 0.0)])
    np.testing.assert_allclose(rates, [0.75, 0.0, 0.75])
    assert rates.sum() == pytest.approx(3 / 2)  # zero-sum: win rates of a group average 1/2
    np.testing.assert_allclose(terminal_rewards(rates, 3), [[0, 0, 0.75], [0, 0, 0], [0, 0, 0.75]])
    with pytest.raises(ValueError, match="every pair"):
        spo_win_rates(3, [(0, 1, 1.0), (0, 2, 0.5)])
    with pytest.raises(ValueError, match="given twice"):
        spo_win_rates(2, [(0, 1, 1.0), (1, 0, 1.0)])


def test_regret_and_partial_return_models_by_hand() -> None:
    # Two states, actions 0 = stay, 1 = switch; r = [[0, 1], [2, 0]], gamma = 0.5.
    next_state = torch.tensor([[0, 1], [1, 0]])
    reward = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    q, v = value_iteration(reward, next_state, 0.5, 80)
    # V*(1) = 2 / (1 - 0.5) = 4 (stay); V*(0) = max(0 + 0.5 V0, 1 + 0.5 * 4) = 3 (switch)
    np.testing.assert_allclose(v.numpy(), [3.0, 4.0])
    # A*(0, stay) = 0 + 1.5 - 3 = -1.5, A*(0, switch) = 0, A*(1, stay) = 0, A*(1, switch) = 0 + 1.5 - 4 = -2.5
    np.testing.assert_allclose((q - v[:, None]).numpy(), [[-1.5, 0.0], [0.0, -2.5]])
    states = torch.tensor([[0, 0], [1, 0]])  # sigma1 = (0 stay)(0 switch), sigma2 = (1 switch)(0 switch)
    actions = torch.tensor([[0, 1], [1, 1]])
    regret_scores = segment_scores(reward, next_state, states, actions, 0.5, "regret", v)
    partial = segment_scores(reward, next_state, states, actions, 0.5, "partial_return")
    np.testing.assert_allclose(regret_scores.numpy(), [-1.5, -2.5])  # sum of A*: -1.5 + 0, -2.5 + 0
    np.testing.assert_allclose(partial.numpy(), [1.0, 1.0])  # both earn 0 + 1
    # sigma1 preferred: regret model -log sigmoid(-1.5 + 2.5) = log(1 + e^-1); partial return log 2 (no opinion)
    assert preference_nll(regret_scores[:1], regret_scores[1:]).item() == pytest.approx(math.log1p(math.exp(-1)))
    assert preference_nll(partial[:1], partial[1:]).item() == pytest.approx(math.log(2))
    # the gradient reaches the reward through V*_r too: d/dr(1, stay) of the regret margin is nonzero
    reward.requires_grad_(True)
    _, v = value_iteration(reward, next_state, 0.5, 80)
    margin = segment_scores(reward, next_state, states, actions, 0.5, "regret", v)
    (margin[0] - margin[1]).backward()
    assert reward.grad[1, 0].abs().item() > 0


def test_vpl_elbo_by_hand() -> None:
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # KL = 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)] = 1 - 0.5 ln 2 = 0.653426
    assert gaussian_kl(mu, logvar).item() == pytest.approx(1 - 0.5 * math.log(2))
    terms = vpl_loss(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), mu, logvar, beta=2.0)
    # nll = mean(log(1 + e^-1), log 2) = (0.313262 + 0.693147) / 2 = 0.503204; + beta KL / N = 2 * 0.653426 / 2
    nll = (math.log1p(math.exp(-1)) + math.log(2)) / 2
    assert terms["nll"].item() == pytest.approx(nll)
    assert terms["loss"].item() == pytest.approx(nll + 1 - 0.5 * math.log(2))
    # q(z | context) pools the pairs: the order of a context's pairs does not change it
    model = VPLModel(obs_dim=2, length=3, latent_dim=2)
    obs, act = torch.rand(1, 4, 4, 2), torch.randint(0, 5, (1, 4, 3))
    order = torch.tensor([2, 0, 3, 1])
    a = model.posterior((obs, act), (obs.flip(1), act.flip(1)))
    b = model.posterior((obs[:, order], act[:, order]), (obs.flip(1)[:, order], act.flip(1)[:, order]))
    torch.testing.assert_close(a, b)


def test_parl_lower_level_and_hypergradient_terms_by_hand() -> None:
    # One state, two actions, r = [0, ln 3]: V = ln(1 + 3) + gamma V -> V = ln 4 / (1 - gamma); pi = [1/4, 3/4]
    reward = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    log_pi, v = soft_value_iteration(reward, torch.tensor([[0, 0]]), gamma=0.5, temperature=1.0, iterations=80)
    assert v.item() == pytest.approx(math.log(4) / 0.5)
    np.testing.assert_allclose(log_pi.exp().numpy(), [[0.25, 0.75]])
    # nll = [log(1 + e^-1), log 2] = [0.313262, 0.693147], mean 0.503204 -> weights [-0.189942, +0.189942]
    # distribution term = weight * sum log pi = [-0.189942 * -1, 0.189942 * -2] = [0.189942, -0.379885]
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    terms = parl_upper_loss(torch.tensor([1.0, 0.0]), torch.zeros(2), logp)
    w = (math.log(2) - math.log1p(math.exp(-1))) / 2
    np.testing.assert_allclose(terms["distribution_term"].detach().numpy(), [w, -2 * w], rtol=1e-6)
    np.testing.assert_allclose(terms["loss"].detach().numpy(),
                               [math.log1p(math.exp(-1)) + w, math.log(2) - 2 * w], rtol=1e-6)
    terms["loss"].sum().backward()  # the score-function weights are constants: d/dlogp = weight
    np.testing.assert_allclose(logp.grad.numpy(), [-w, w], rtol=1e-6)


# -- env, teacher ----------------------------------------------------------------------------------------------------

def test_pref_reach_tables_match_the_env() -> None:
    env = PrefReachEnv(size=4, horizon=5, goal=(3, 3))
    nxt, r = transition_table(4), reward_table(4, (3, 3))
    obs, _ = env.reset(seed=3)
    for action in [0, 1, 4, 2, 3]:
        cell = cell_index(obs, 4)
        obs, reward, terminated, truncated, _ = env.step(action)
        assert cell_index(obs, 4) == nxt[cell, action]
        assert reward == pytest.approx(r[cell, action])
        assert not terminated
    assert truncated  # horizon 5
    assert r[3 * 4 + 3, 0] == 0.0 and r[0, 0] == pytest.approx(-6 / 3)  # at the goal / farthest corner
    q = optimal_q(4, (3, 3), 0.9)
    assert q[0].argmax() in (1, 4)  # from (0, 0) move up or right
    with pytest.raises(ValueError, match="goal"):
        PrefReachEnv(size=4, goal=(4, 0))


def test_bradley_terry_teacher() -> None:
    rng = np.random.default_rng(0)
    assert list(bradley_terry_choices(np.array([5.0, -5.0]), np.array([-5.0, 5.0]), 10.0, rng)) == [0, 1]
    # P(0 preferred) = sigmoid(1 * ln 3) = 0.75
    choices = bradley_terry_choices(np.full(20_000, math.log(3)), np.zeros(20_000), 1.0, rng)
    assert abs((choices == 0).mean() - 0.75) < 0.015


# -- the segment table ----------------------------------------------------------------------------------------------

def segments(n: int, length: int = 3, start: int = 0) -> dict[str, np.ndarray]:
    return {"obs": np.full((n, length + 1, 2), 0.5, np.float32) + np.arange(start, start + n)[:, None, None],
            "action": np.ones((n, length), np.int64), "user": np.zeros(n, np.int64), "episode": np.arange(n),
            "true_return": -np.arange(start, start + n, dtype=np.float32),
            "optimal_advantage": np.zeros(n, np.float32)}


def test_segment_table_schema_ids_and_hidden_fields(rclient, namespace) -> None:  # noqa: F811
    table = SegmentTable.create(rclient, namespace, "segments", obs_dim=2, length=3, max_size=4)
    ids = table.insert(segments(3))
    assert ids == ["seg-0", "seg-1", "seg-2"] and table.live_ids() == ids
    data = table.read(["seg-2", "seg-0"])
    assert set(data) == {"obs", "action", "user", "episode"}  # no hidden field for learners
    np.testing.assert_allclose(data["obs"][:, 0, 0], [2.5, 0.5])
    np.testing.assert_allclose(table.read(["seg-1"], ("true_return",), teacher=True)["true_return"], [-1.0])
    with pytest.raises(PermissionError, match="hidden"):
        table.read(["seg-1"], ("obs", "true_return"))
    # the schema rejects bad segments, naming the field, and writes nothing
    bad_shape = segments(1) | {"obs": np.zeros((1, 3, 2), np.float32)}
    with pytest.raises(SchemaError, match="'obs'"):
        table.insert(bad_shape)
    with pytest.raises(SchemaError, match="'action'.*cannot be cast"):
        table.insert(segments(1) | {"action": np.ones((1, 3), np.float32)})
    with pytest.raises(SchemaError, match="'true_return'.*NaN"):
        table.insert(segments(1) | {"true_return": np.array([np.nan], np.float32)})
    with pytest.raises(SchemaError, match="missing"):
        table.insert({k: v for k, v in segments(1).items() if k != "user"})
    assert table.live_ids() == ids
    # ids are validated: malformed ones, and ones the FIFO ring has evicted, are refused
    for bad in ("seg-", "seg-01", "seg--1", "3", "seg-1 ", 7):
        with pytest.raises(ValueError, match="not a segment id"):
            parse_segment_id(bad)
    table.insert(segments(3, start=3))  # 6 inserted into 4 slots: seg-0 and seg-1 are gone
    with pytest.raises(ReplayError, match=r"seg-1 is not in the table \(live ids seg-2\.\.seg-5\)"):
        table.read(["seg-2", "seg-1"])
    np.testing.assert_allclose(table.read([segment_id(5)])["obs"][:, 0, 0], [5.5])
    table.drop()


# -- every rule through Ray + Redis ---------------------------------------------------------------------------------

TRAIN = {"cpl": cpl.train_cpl, "spo": spo.train_spo, "regret_pref": regret_pref.train_regret_pref,
         "vpl": vpl.train_vpl, "parl": parl.train_parl}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_smoke_through_ray_and_redis(rule, ray_session, rclient, namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=1000)
    result = TRAIN[rule.name](rule, seed=0, overrides=rule.smoke_overrides, queue=queue)
    info = queue.info()
    # every pair the learner asked for was labelled by the teacher, learned from and acked exactly once
    assert result["pairs_acked"] > 0
    assert info["added"] == info["labelled"] == info["acked"] == result["pairs_acked"]
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    assert len(queue.used(queue.epoch)) == result["pairs_acked"]
    assert result["env_steps"] > 0 and math.isfinite(result["return"])
    # the segment table was dropped with the run
    assert not [k for k in rclient.keys(f"rlfleet:{namespace}:segments:*")]


def test_bad_options_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown option 'alhpa' for rule cpl"):
        cpl.train_cpl(cpl.RULE, overrides={"alhpa": 0.1})
    with pytest.raises(ValueError, match=r"conservative_bias \(lambda\) must be in \(0, 1\]"):
        cpl.train_cpl(cpl.RULE, overrides={"conservative_bias": 0.0})
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        spo.train_spo(spo.RULE, overrides={"group_size": 1})
    with pytest.raises(ValueError, match="teacher must be one of"):
        regret_pref.train_regret_pref(regret_pref.RULE, overrides={"teacher": "oracle"})
    with pytest.raises(ValueError, match="reward_model must be one of"):
        regret_pref.train_regret_pref(regret_pref.RULE, overrides={"reward_model": "reward"})
    with pytest.raises(ValueError, match="context_pairs"):
        vpl.train_vpl(vpl.RULE, overrides={"context_pairs": 5000})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        parl.train_parl(parl.RULE, overrides={"temperature": 0.0})


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_learning_check_true_return(rule, ray_session) -> None:
    report = MODULES[rule.name].run_learning_check(rule)
    print(report)
    assert report["passed"], report


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_registered_with_a_check_runner(rule) -> None:
    import importlib

    from algorithms.registry import RULES as REGISTERED
    from algorithms.registry import rule_defaults

    assert REGISTERED[rule.name] is rule and rule.family == "preference" and not rule.trains_on_env_steps
    module, _, function = rule.check_runner.partition(":")
    assert getattr(importlib.import_module(module), function) is MODULES[rule.name].run_learning_check
    assert rule.learning_check.env == "PrefReach-v0" and rule.learning_check.threshold == -3.9
    assert set(rule.smoke_overrides) <= set(vars(rule.config_class())) and rule_defaults(rule)
