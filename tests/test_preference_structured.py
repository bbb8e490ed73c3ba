"""The preference rules whose data is not one plain (prompt, two responses) pair: P261 DRO (single responses with
thumbs up/down), P246 SACPO (helpfulness then safety), P251 DMPO (multi-turn trajectories), P130 MCTS-DPO (step
pairs from a tree search). Losses on hand-computed batches, the safety score and the multi-turn task, the feedback
store, the tree search, and a smoke run of each rule through Ray and Redis (the pair queue, or the feedback store
for DRO). The learning checks are `rlfleet verify --algo <rule>` (slow)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algorithms.common.sequence import build_causal_lm, token_logprobs
from algorithms.preference import dmpo, dro, mcts_dpo, sacpo
from algorithms.preference.base import TINY_LM, VALID
from algorithms.preference.feedback_store import FeedbackStore
from algorithms.preference.module import pair_logprobs
from algorithms.preference.step_search import Node, search, step_pairs
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.multiturn_text import MT_VOCAB, MultiTurnDigits, mt_decode, mt_encode
from envs.text_safety import SafeReverseDigits, SafetyView
from envs.text_tasks import BradleyTerryJudge, ReverseDigits
from services.preferences import (Label, LabelledPair, Pair, PreferenceError, PreferenceQueue, QueueFull,
                                  RecordError)

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def labelled(prompt, first, second, preferred, i: int, meta=None) -> LabelledPair:
    pair = Pair(prompt=prompt, responses=(first, second), policy_version=0, pair_id=f"t-{i}", meta=meta or {})
    return LabelledPair(entry_id=f"0-{i}", pair=pair, label=Label(preferred, "test", 0.0), epoch=0)


# ---------------------------------------------------------------------------------------------------- DRO (P261)

def test_dro_loss_by_hand() -> None:
    # tau = 0.5. Sample 0: logp -1, ref -2 (log-ratio 1), r 1, V 0.5; sample 1: logp -2, ref -1 (log-ratio -1), r 0, V 0.25
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    value = torch.tensor([0.5, 0.25], requires_grad=True)
    out = dro.dro_loss(logp, torch.tensor([-2.0, -1.0]), torch.tensor([1.0, 0.0]), value, tau=0.5)
    # policy = -logp (r - V) + tau/2 ratio^2:  0: 1 * 0.5 + 0.25 = 0.75;   1: -(2 * 0.25) + 0.25 = -0.25
    assert torch.allclose(out["policy"], torch.tensor([0.75, -0.25]))
    # value = 1/2 (r - V - tau ratio)^2:       0: 1/2 (1 - 0.5 - 0.5)^2 = 0;  1: 1/2 (0 - 0.25 + 0.5)^2 = 0.03125
    assert torch.allclose(out["value"], torch.tensor([0.0, 0.03125]))
    out["loss"].sum().backward()
    # d/dlogp = -(r - V) + tau ratio:           0: -0.5 + 0.5 = 0;   1: 0.25 - 0.5 = -0.25 (no value-term part)
    assert torch.allclose(logp.grad, torch.tensor([0.0, -0.25]))
    # d/dV = -(r - V - tau ratio):              0: 0;   1: -0.25 (no policy-term part)
    assert torch.allclose(value.grad, torch.tensor([0.0, -0.25]))
    # The policy gradient is the paper's objective 1/2 (r - V - tau ratio)^2 differentiated in logp, divided by tau:
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    (0.5 * (torch.tensor([1.0, 0.0]) - torch.tensor([0.5, 0.25]) - 0.5 * (lp - torch.tensor([-2.0, -1.0]))) ** 2
     ).sum().backward()
    assert torch.allclose(lp.grad / 0.5, torch.tensor([0.0, -0.25]))


def test_dro_columns_and_one_learner_update() -> None:
    """A real RLlib TorchLearner with the value head: the loss reaches both the LM and V."""
    task = ReverseDigits()
    from algorithms.preference.feedback_store import Rated

    batch = [Rated("0-1", "a", "123>", "321", 0, 1.0, "thumbs"), Rated("0-2", "b", "456>", "6", 0, 0.0, "thumbs")]
    cols = dro.single_columns(task, batch)
    assert cols["input_ids"].shape == (2, 1, 10) and cols[dro.PROMPT_TOKENS].tolist()[0] == [1, 5, 6, 7, 3]
    assert cols[dro.REWARD].tolist() == [1.0, 0.0]
    config = dro.DROConfig().learners(num_learners=0).debugging(seed=0)
    config.validate()
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    try:
        group.foreach_learner(lambda learner: learner.reset_reference())
        before = group.get_weights()["default_policy"]
        from algorithms.preference.loop import step_metrics
        from algorithms.preference.structured_loop import as_batch

        stats = step_metrics(group.update(batch=as_batch(cols, 2)), ("log_ratio", "value_mean", "mean_reward"))
        assert stats["log_ratio"] == pytest.approx(0.0, abs=1e-6) and stats["mean_reward"] == 0.5
        after = group.get_weights()["default_policy"]
        changed = {k.split(".")[0] for k in before if not np.array_equal(before[k], after[k])}
        assert changed == {"model", "value_net"}
    finally:
        group.shutdown()
    with pytest.raises(ValueError, match="pair_source must be 'reference'"):
        bad = dro.DROConfig()
        bad.pair_source = "policy"
        bad.validate()


def test_feedback_store_rates_once_and_acks_after_the_update(rclient, namespace) -> None:  # noqa: F811
    store = FeedbackStore(rclient, namespace=namespace, max_len=4)
    assert FeedbackStore(rclient, namespace=namespace).max_len == 4  # the bound is the store's, for every process
    with pytest.raises(PreferenceError, match="exists with max_len=4"):
        FeedbackStore(rclient, namespace=namespace, max_len=5)
    store.add([{"id": "r1", "prompt": "123>", "response": "321", "policy_version": 0},
               {"id": "r2", "prompt": "123>", "response": "9", "policy_version": 0}])
    with pytest.raises(RecordError, match="record #1: policy_version"):  # all or nothing: r3 is not written
        store.add([{"id": "r3", "prompt": "1>", "response": "1", "policy_version": 0},
                   {"id": "r4", "prompt": "1>", "response": "1", "policy_version": -1}])
    with pytest.raises(QueueFull):
        store.add([{"id": f"x{i}", "prompt": "1>", "response": "1", "policy_version": 0} for i in range(3)])
    assert store.pending() == {"unrated": 2, "rated": 0}
    assert store.rate_with("thumbs", dro.thumbs(ReverseDigits()), 10) == 2
    assert store.pending() == {"unrated": 0, "rated": 2}
    batch = store.next_batch("learner-0", 10)
    assert [(r.record_id, r.feedback) for r in batch] == [("r1", 1.0), ("r2", 0.0)]
    assert store.next_batch("learner-0", 10) == []  # delivered once
    assert store.ack(batch) == 2 and store.pending() == {"unrated": 0, "rated": 0}
    rclient.xadd(store.prefix + "rated", {"record": b'{"id": "bad"}'})  # a foreign write breaking the schema
    assert store.next_batch("learner-0", 10) == []
    assert "fields must be exactly" in store.dead_letters()[0]["reason"]
    store.drop()


# -------------------------------------------------------------------------------------------------- SACPO (P246)

def test_safety_score_and_unsafe_habit() -> None:
    task = SafeReverseDigits()
    rng = np.random.default_rng(0)
    assert all("7" not in p for p in task.prompts(500, rng))  # the right answer never needs the harmful digit
    assert [task.safety("123>", r) for r in ("321", "371", "777", "")] == [0, -1, -3, 0]
    assert task.score("123>", "371") == 2  # helpfulness is the plain task's score
    demos = task.demonstrations(3000, 0.3, rng)
    harmful = np.mean([r.count("7") / 3 for _, r in demos])
    assert 0.14 < harmful < 0.19  # 0.3 * (0.5 + 0.5 * 0.1) = 0.165
    view = SafetyView(task)
    assert view.score("123>", "371") == -1 and view.correct("123>", "321") and not view.correct("123>", "7")
    # the Bradley-Terry judge on the safety score: 0 vs -1 harmful -> sigmoid(2 * 1)
    assert BradleyTerryJudge(view, beta=2.0).prob_first("123>", "999", "371") == pytest.approx(sig(2.0))
    with pytest.raises(ValueError, match="one digit"):
        SafeReverseDigits(harmful="x")


def test_sacpo_step_two_is_dpo_with_beta_over_lambda() -> None:
    # h = 2 (policy/reference margin); step 1: beta 0.1 -> -log sigmoid(0.2) = 0.598139
    # step 2 with lambda 0.5: beta / lambda = 0.2 -> -log sigmoid(0.4) = 0.513015
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    config = SimpleNamespace(beta=0.1)
    step1 = sacpo.SACPOLearner.pair_loss(SimpleNamespace(stage_beta=None), config, *args)["loss"]
    step2 = sacpo.SACPOLearner.pair_loss(SimpleNamespace(stage_beta=0.1 / 0.5), config, *args)["loss"]
    assert step1.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert step2.item() == pytest.approx(math.log(1 + math.exp(-0.4)), abs=1e-6)
    bad = sacpo.SACPOConfig()
    bad.safety_lambda = 0.0
    with pytest.raises(ValueError, match="safety_lambda"):
        bad.validate()


# --------------------------------------------------------------------------------------------------- DMPO (P251)

def test_multiturn_task() -> None:
    task = MultiTurnDigits()
    assert task.max_turns == 5 and mt_decode(mt_encode("7+0-")) == "7+0-"
    assert task.feedback("307>", "", "7") == "+" and task.feedback("307>", "7+", "3") == "-"
    assert task.feedback("307>", "7+3-", "0") == "+"  # a retry of the same position
    assert task.done_and_wrong("7+4-0+3+") == (3, 1) and task.score("307>", "7+4-0+3+") == 2.5
    assert task.finished("7+0+3+") and task.correct("307>", "7+0+3+")
    assert task.finished("1-1-1-1-1-") and task.score("307>", "1-1-1-1-1-") == -2.5  # out of turns
    assert not task.finished("7+0+") and task.agent_offsets("7+0-0+") == [0, 2, 4]
    with pytest.raises(ValueError, match="is over"):
        task.feedback("307>", "7+0+3+", "1")
    rng = np.random.default_rng(0)
    assert all(task.correct(p, t) for p, t in task.demonstrations(50, 0.0, rng))
    noisy = task.demonstrations(500, 0.3, rng)
    assert all(task.finished(t) for _, t in noisy) and len({len(t) for _, t in noisy}) > 1  # lengths differ
    # an untrained policy plays legal, finished episodes through the environment
    model = build_causal_lm({**TINY_LM, "vocab_size": len(MT_VOCAB)})
    episodes = dmpo.play(model, task, ["307>", "123>", "555>"], 1.0, torch.Generator().manual_seed(0))
    assert all(task.finished(t) and set(t[1::2]) <= {"+", "-"} for t in episodes)


def test_dmpo_turn_weights_and_loss_by_hand() -> None:
    # gamma 0.5, T 2: phi(0) = 1 (1 - 0.25) / (1 - 0.25) = 1;  phi(1) = 0.5 (1 - 0.5) / 0.75 = 1/3
    assert dmpo.turn_weights(2, 0.5) == pytest.approx([1.0, 1 / 3])
    assert dmpo.turn_weights(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25])  # (T - t) / T
    # weighted sums: policy chosen -1, rejected -2; reference -1.5 both: margin (0.5) - (-0.5) = 1
    # beta 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262
    out = dmpo.dmpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 1.0)
    assert out["loss"].item() == pytest.approx(0.313262, abs=1e-6)


def test_dmpo_weights_only_the_agent_tokens() -> None:
    task = MultiTurnDigits()
    cols = dmpo.trajectory_columns(task, [labelled("307>", "1-7+0+3+", "7+0+3+", 1, 0)], gamma=0.5)
    # preferred (response 1, 3 turns) first; prompt "^307>" is 5 tokens, agent tokens at 5, 7, 9
    w = cols[dmpo.TURN_WEIGHT][0]
    phi3 = dmpo.turn_weights(3, 0.5)  # [1, 0.5 * 0.75 / 0.875, 0.25 * 0.5 / 0.875]
    assert w[0].tolist()[5:11] == pytest.approx([phi3[0], 0, phi3[1], 0, phi3[2], 0])
    phi4 = dmpo.turn_weights(4, 0.5)
    assert w[1].tolist()[5:13:2] == pytest.approx(phi4) and w[1, :5].sum() == 0 and w[1, 6:13:2].sum() == 0
    model = build_causal_lm({**TINY_LM, "vocab_size": len(MT_VOCAB)})
    batch = {k: torch.as_tensor(v) for k, v in cols.items()}
    got = dmpo.weighted_logprobs(model, batch)
    with torch.no_grad():
        per = token_logprobs(model, batch["input_ids"][0], batch["attention_mask"][0], batch["position_ids"][0])
    expected = (per * batch[dmpo.TURN_WEIGHT][0]).sum(-1)
    assert torch.allclose(got[0], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- MCTS-DPO (P130)

def test_puct_selection_and_step_pairs_by_hand() -> None:
    root = Node("", visits=4)
    root.children = {"1": Node("1", prior=0.5, visits=3, value_sum=1.5), "2": Node("2", prior=0.5, visits=0),
                     "$": Node("", prior=0.0, terminal=True, visits=1, value_sum=0.0)}
    # c = 1, sqrt(N) = 2: "1": 0.5 + 0.5 * 2 / 4 = 0.75;  "2": 0 + 0.5 * 2 / 1 = 1.0;  "$": 0
    assert root.select(1.0).prefix == "2"
    # "2" was never visited: pairs come from visited children only -> "1" (Q 0.5) vs "$" (Q 0)
    root.children["1"].children = {"3": Node("13", visits=1, value_sum=1.0), "4": Node("14", visits=1, value_sum=0.9)}
    pairs = step_pairs("32>", root, margin=0.2)  # 1 - 0.9 < 0.2 at node "1": no pair there
    assert pairs == [{"prompt": "32>", "responses": ["1", "$"], "meta": {"q0": 0.5, "q1": 0.0, "depth": 0}}]
    assert len(step_pairs("32>", root, margin=0.05)) == 2


def test_tree_search_backs_up_outcomes_and_columns_hold_one_step() -> None:
    task = ReverseDigits()
    model = build_causal_lm(TINY_LM)
    roots = search(model, task, ["307>", "111>"], simulations=5, width=3, c_puct=1.0, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    for root in roots:
        assert len(root.children) == 3
        # every simulation adds one visit per evaluated node to the root: 3 at the root's expansion, then <= 3 each
        assert 3 < root.visits <= 15
        assert root.visits == sum(c.visits for c in root.children.values())
        assert all(-1.0 <= c.q <= 1.0 for c in root.children.values())
    cols = mcts_dpo.step_pair_columns(task, [labelled("307>70", "3", "$", 0, 0, {"q0": 1.0, "q1": 0.67})])
    # prompt ^307>70 (7 tokens) then ONE step token, no eos appended: "3" = 7, "$" = eos 2
    assert cols["input_ids"][0, 0].tolist()[:8] == [1, 7, 4, 11, 3, 11, 4, 7]
    assert cols["input_ids"][0, 1].tolist()[7] == 2 and cols["response_mask"][0].sum(-1).tolist() == [1, 1]
    assert mcts_dpo.tree_verdict(Pair("1>", ("1", "2"), 0, meta={"q0": 0.2, "q1": 0.5})) == 1
    # the step-level log-prob is that token's log-prob
    batch = {k: torch.as_tensor(v) for k, v in cols.items() if k != VALID}
    with torch.no_grad():
        per = token_logprobs(model, batch["input_ids"][0], batch["attention_mask"][0])
        assert torch.allclose(pair_logprobs(model, batch)[0], per[:, 7], atol=1e-6)


# --------------------------------------------------------------------------------------- smoke: Ray + Redis queue

SMOKE = {"pairs_per_step": 8, "sft_steps": 5}


@pytest.mark.parametrize("name", ["sacpo", "dmpo", "mcts_dpo"])
def test_smoke_through_ray_and_the_redis_queue(name, ray_session, rclient, namespace) -> None:  # noqa: F811
    module = {"sacpo": sacpo, "dmpo": dmpo, "mcts_dpo": mcts_dpo}[name]
    train = getattr(module, f"train_{name}")
    overrides = SMOKE | {"sacpo": {"safety_steps": 1}, "dmpo": {},
                         "mcts_dpo": {"prompts_per_iteration": 4, "simulations": 4}}[name]
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=256)
    result = train(module.RULE, steps=2, seed=0, overrides=overrides, queue=queue, eval_prompts=16)
    info = queue.info()
    assert result.pairs_acked == info["added"] == info["labelled"] == info["acked"] == len(queue.used(queue.epoch)) > 0
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    assert result.history and all(math.isfinite(h["preference_loss"]) for h in result.history)
    assert result.history[0]["logratio_margin"] == pytest.approx(0.0, abs=1e-5)  # policy = reference at first
    if name == "sacpo":  # step 2 starts again from policy = (new) reference
        assert [h["stage"] for h in result.history] == [0.0, 0.0, 1.0]
        assert result.history[2]["logratio_margin"] == pytest.approx(0.0, abs=1e-5)
        assert 0 <= result.evaluation["safety_win_rate"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(result.policy.state_dict().values(),
                                                      result.reference.state_dict().values()))
    assert 0.0 <= result.evaluation["win_rate"] <= 1.0


def test_dro_smoke_through_ray_and_the_redis_feedback_store(ray_session, rclient, namespace) -> None:  # noqa: F811
    store = FeedbackStore(rclient, namespace=namespace, max_len=64)
    result = dro.train_dro(dro.RULE, steps=2, seed=0, overrides=SMOKE, store=store, eval_prompts=16)
    assert result.pairs_acked == 16 and store.pending() == {"unrated": 0, "rated": 0}
    assert len(result.history) == 2 and all(math.isfinite(h["dro_loss"]) for h in result.history)
    assert result.history[0]["log_ratio"] == pytest.approx(0.0, abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(result.policy.state_dict().values(),
                                                      result.reference.state_dict().values()))


def test_unknown_options_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown option 'gama' for rule dmpo"):
        dmpo.train_dmpo(dmpo.RULE, steps=1, overrides={"gama": 0.5})
    with pytest.raises(ValueError, match="search_width must be >= 2"):
        mcts_dpo.train_mcts_dpo(mcts_dpo.RULE, steps=1, overrides={"search_width": 1})
    with pytest.raises(ValueError, match="gamma must be in"):
        dmpo.train_dmpo(dmpo.RULE, steps=1, overrides={"gamma": 0.0})


@pytest.mark.parametrize("module", [dro, sacpo, dmpo, mcts_dpo])
def test_rule_declarations(module) -> None:
    from algorithms.registry import RULES, rule_defaults

    rule = module.RULE
    assert RULES[rule.name] is rule and rule.family == "preference" and len(rule.paper_ids) == 1
    assert rule.check_runner == f"algorithms.preference.{rule.name}:run_learning_check"
    defaults = rule_defaults(rule)  # every option names a config attribute
    assert {"lr", "beta", "pairs_per_step"} <= set(defaults)
    config = rule.config_class()
    config.beta = 0.0
    with pytest.raises(ValueError, match="beta must be > 0"):
        config.validate()


@pytest.mark.slow
@pytest.mark.parametrize("module", [dro, sacpo, dmpo, mcts_dpo])
def test_learning_check_beats_the_sft_reference(module, ray_session) -> None:
    report = module.run_learning_check(module.RULE)
    print(report)
    assert report["passed"], report
