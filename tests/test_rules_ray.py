"""Every registered rule through the real Ray path: EnvRunner actor, learner update, checkpoint, restore."""

import numpy as np
import pytest
import torch

from algorithms.registry import RULES, build_config, get_rule
from cluster.train import sync_runner_weights


def _runner_weights(algo) -> dict:
    results = algo.env_runner_group.foreach_env_runner(
        lambda runner: {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
                        for k, v in runner.module.state_dict().items()},
        local_env_runner=False,
    )
    return results[0]


def smoke_options(rule) -> dict[str, str]:
    """One cheap iteration: a small batch, few epochs, one EnvRunner actor (the real Ray path)."""
    options = {"train_batch_size": "256", "num_env_runners": "1", "minibatch_size": "64", "num_epochs": "2"}
    options = {k: v for k, v in options.items() if k in rule.option_names()}
    return options | {k: str(v) for k, v in rule.smoke_overrides.items()}


def smoke_prior(rule, runs_dir) -> dict[str, str]:
    """A rule whose check starts from an earlier run (LearningCheck.prior) gets one cheap iteration of that run."""
    prior = rule.learning_check.prior
    if prior is None:
        return {}
    from cluster.train import train

    prior_rule = get_rule(prior.rule)
    result = train(prior.rule, prior.env, stop_steps=1, seed=0, runs_dir=runs_dir, progress=False,
                   overrides=smoke_options(prior_rule))
    return {prior.option: str(result.run_dir)}


# Rules with their own loop (check_runner: preference pairs, reward models) have their own Ray smoke tests
# (e.g. tests/test_preference_loop.py for the pairwise rules through the Redis queue).
ENV_RULES = sorted(name for name, rule in RULES.items() if rule.trains_on_env_steps)


@pytest.mark.parametrize("name", ENV_RULES)
def test_rule_trains_checkpoints_and_restores(name, ray_session, tmp_path):
    rule = get_rule(name)
    env_id = rule.learning_check.env
    options = smoke_options(rule) | smoke_prior(rule, tmp_path / "prior")
    config, _ = build_config(rule, env_id, 0, options)
    algo = config.build_algo()
    try:
        before = {k: v.clone() for k, v in algo.get_module().state_dict().items()}
        result = algo.train()
        learner = result["learners"]["default_policy"]
        assert np.isfinite(learner["vf_loss"]) and np.isfinite(learner["policy_loss"])
        after = algo.get_module().state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), "the update changed no parameter"
        algo.save_to_path(str(tmp_path / "ckpt"))
        trained = {k: v.clone() for k, v in after.items()}
    finally:
        algo.stop()

    fresh, _ = build_config(rule, env_id, 1, options)
    restored = fresh.build_algo()
    try:
        restored.restore_from_path(str(tmp_path / "ckpt"))
        sync_runner_weights(restored)
        learner_weights = restored.get_module().state_dict()
        for key, value in trained.items():
            torch.testing.assert_close(learner_weights[key], value)
        # The weight-sync fix: the remote EnvRunner acts with the restored weights, not its random init.
        runner = _runner_weights(restored)
        for key, value in runner.items():
            np.testing.assert_allclose(value, learner_weights[key].numpy(), rtol=1e-6)
        restored.train()  # and training goes on from there
    finally:
        restored.stop()


def test_trpo_step_respects_the_trust_region(ray_session):
    config, _ = build_config(get_rule("trpo"), "CartPole-v1", 0, {"train_batch_size": "512", "max_kl": "0.005"})
    algo = config.build_algo()
    try:
        for _ in range(2):
            learner = algo.train()["learners"]["default_policy"]
            assert learner["mean_kl_loss"] <= 0.005 + 1e-6
    finally:
        algo.stop()


def test_raw_advantages_switch_reaches_the_connector(ray_session):
    from algorithms.onpolicy.gae import GAEConnector

    config, options = build_config(get_rule("gae"), "CartPole-v1", 0, {"train_batch_size": "128"})
    assert options["standardize_advantages"] is False
    algo = config.build_algo()
    try:
        learner = algo.learner_group._learner
        pieces = [c for c in learner._learner_connector.connectors if isinstance(c, GAEConnector)]
        assert len(pieces) == 1 and pieces[0].standardize_advantages is False
        names = [type(c).__name__ for c in learner._learner_connector.connectors]
        assert "GeneralAdvantageEstimation" not in names  # RLlib's always-standardising GAE is replaced
    finally:
        algo.stop()
