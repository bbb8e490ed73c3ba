"""PARL: bilevel policy alignment (P001, Chakraborty et al. 2023, "PARL: A Unified Framework for Policy Alignment
in Reinforcement Learning from Human Feedback").

Reward learning and policy learning are one bilevel problem: the preference data the upper level fits come from
the lower level's optimal policy, so the reward parameters nu must account for how they move that policy.

    upper:  min_nu  G(nu) = E_{tau ~ pi*_nu, y ~ teacher} [ l_nu(tau, y) ], l_nu = -log sigmoid(R_nu(tau+) - R_nu(tau-))
    lower:  pi*_nu = argmax_pi  E_pi[ sum_t gamma^t (r_nu(s_t, a_t) + temperature H(pi(.|s_t))) ]

The hypergradient (the paper's A-PARL gradient) has the usual reward-learning term plus the term through the data
distribution of pi*_nu:

    grad G = E[ grad_nu l_nu(tau, y) ] + E[ l_nu(tau, y) grad_nu log rho_{pi*_nu}(tau) ],
    grad_nu log rho_{pi*_nu}(tau) = sum_t grad_nu log pi*_nu(a_t | s_t)   (the dynamics do not depend on nu)

The paper approximates grad_nu pi*_nu with implicit differentiation of the lower-level optimality condition; with
an entropy-regularised lower level on a known tabular MDP, pi*_nu = exp((Q_soft - V_soft) / temperature) is an
explicit differentiable function of nu (unrolled soft value iteration), so autodiff gives the exact hypergradient.
The loss we minimise per labelled pair i of the current lower-level policy's segments (both segments' steps in
the log-probability):

    L(nu) = mean_i [ l_nu(i) + (stopgrad(l_nu(i)) - b) * sum_{t in tau_i+, tau_i-} log pi*_nu(a_t | s_t) ],
    b = mean_i stopgrad(l_nu(i))     (a baseline: our choice, it leaves the expectation unchanged)

Data flow per outer iteration: soft value iteration on r_nu gives pi*_nu (a tabular policy) -> weights to the
collector actor -> it rolls pi*_nu out into the Redis segment table -> pairs of those segments go through the
Redis preference queue to the scripted teacher (Bradley-Terry on the hidden true return) -> `inner_steps` Adam
steps on L(nu) -> acked. The final policy is pi*_nu of the last nu, evaluated greedily by the true return.

Choices the paper leaves open, and ours: a tabular reward r_nu(s, a); temperature 1 (the reward's scale is learned,
so it only fixes units); 120 soft value-iteration sweeps warm-started from the previous values (detached); 50
outer iterations of 16 episodes (32 segments, 64 pairs), 5 inner Adam steps (lr 0.05) each; gamma = 0.99.
The inner steps matter: the data-distribution term is a score-function (on-policy) estimate, so many steps on one
batch drift off-policy. Measured (seed 0, true return): 25 x 20 inner steps -5.96 (the same without the
distribution term -1.86); 50 x 5: -1.93; 100 x 1: -1.86. `distribution_term=False` is the ablation
(plain reward learning on the lower-level policy's data); the learning check reports it beside PARL.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from algorithms.common.config_fields import check_positive_ints
from algorithms.options import Option, positive
from algorithms.preference.control_checks import reach_check
from algorithms.preference.control_collect import TabularPolicy, evaluate_true_return, policy_state
from algorithms.preference.control_loop import (
    CONTROL_OPTIONS, EVAL_SEED_OFFSET, ControlPreferenceConfig, apply_overrides, chosen_rejected, control_session,
    random_pairs, run_seeds, single_threaded,
)
from algorithms.preference.regret_pref import preference_nll
from algorithms.rule import Rule
from envs.pref_reach import MOVES, PrefReachEnv, cell_index, transition_table
from services.preferences import PreferenceQueue


def soft_value_iteration(reward: torch.Tensor, next_state: torch.Tensor, gamma: float, temperature: float,
                         iterations: int, v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable entropy-regularised optimum: (log pi*(a|s) (S, A), V_soft (S,)) of a deterministic MDP,
    V(s) = temperature logsumexp_a ((r(s, a) + gamma V(s')) / temperature)."""
    v = torch.zeros(reward.shape[0], dtype=reward.dtype) if v0 is None else v0
    for _ in range(iterations):
        v = temperature * torch.logsumexp((reward + gamma * v[next_state]) / temperature, dim=1)
    q = reward + gamma * v[next_state]
    return torch.log_softmax(q / temperature, dim=1), v


def parl_upper_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor,
                    trajectory_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair PARL terms: the reward-learning NLL and the data-distribution (score-function) term, whose
    gradients sum to the hypergradient. trajectory_logp = sum_t log pi*_nu(a_t|s_t) over both segments (B,)."""
    nll = preference_nll(score_chosen, score_rejected)
    weight = nll.detach() - nll.detach().mean()
    distribution = weight * trajectory_logp
    return {"loss": nll + distribution, "nll": nll, "distribution_term": distribution}


class PARLConfig(ControlPreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.teacher = "return"
        self.lr = 0.05
        self.temperature = 1.0
        self.iterations = 50
        self.episodes_per_iteration = 16
        self.pairs_per_iteration = 64
        self.inner_steps = 5
        self.vi_iterations = 120
        self.distribution_term = True  # False: the ablation without the lower level's data-distribution term

    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "iterations", "episodes_per_iteration", "pairs_per_iteration", "inner_steps",
                            "vi_iterations")
        if not self.temperature > 0:
            self._value_error(f"temperature must be > 0, got {self.temperature}")
        if self.env_id != "PrefReach-v0":
            self._value_error("parl solves its lower level on the known tabular dynamics of PrefReach-v0")


@single_threaded
def train_parl(rule: Rule, seed: int = 0, overrides: dict[str, Any] | None = None,
               queue: PreferenceQueue | None = None) -> dict[str, Any]:
    """Outer iterations: lower-level policy -> collector -> queue/teacher -> hypergradient steps on nu."""
    config: PARLConfig = apply_overrides(rule, overrides)
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = PrefReachEnv(**config.users[0]).size
    next_state = torch.as_tensor(transition_table(size))
    reward = torch.zeros((size * size, len(MOVES)), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([reward], lr=config.lr)
    policy = TabularPolicy(size, len(MOVES))
    v = None
    history, env_steps, acked = [], 0, 0

    def lower_level(v0):
        return soft_value_iteration(reward, next_state, config.teacher_gamma, config.temperature,
                                    config.vi_iterations, v0)

    cap = 4 * config.episodes_per_iteration * 64
    with control_session(config, rule.name, seed, cap, policy.spec(), queue) as session:
        for it in range(config.iterations):
            with torch.no_grad():
                log_pi, v = lower_level(None if v is None else v)
                policy.logits.copy_(log_pi.float())
            session.set_weights(policy_state(policy))
            collected = session.collect(config.episodes_per_iteration, behaviour="policy")
            env_steps += collected["env_steps"]
            ids = [i for episode in collected["ids"] for i in episode]
            batch = session.channel.ask(random_pairs(ids, config.pairs_per_iteration, rng), version=it)
            chosen, rejected, _ = chosen_rejected(batch)
            segs = [session.read(x) for x in (chosen, rejected)]
            states = [torch.as_tensor(cell_index(d["obs"][:, :-1].numpy(), size)) for d in segs]
            actions = [d["action"] for d in segs]
            for _ in range(config.inner_steps):
                log_pi, v_new = lower_level(v.detach())
                scores = [reward[s, a].sum(-1) for s, a in zip(states, actions)]
                logp = sum(log_pi[s, a].sum(-1) for s, a in zip(states, actions))
                terms = parl_upper_loss(scores[0], scores[1], logp)
                optimizer.zero_grad()
                terms["loss" if config.distribution_term else "nll"].mean().backward()
                optimizer.step()
            v = v_new.detach()
            acked += session.channel.ack(batch)
            history.append({k: float(t.detach().mean()) for k, t in terms.items()} | {"iteration": it})
    with torch.no_grad():
        log_pi, _ = lower_level(v)
        policy.logits.copy_(log_pi.float())
    true_return = evaluate_true_return(policy, config.env_id, config.users[0], config.eval_episodes,
                                       seed + EVAL_SEED_OFFSET)
    return {"seed": seed, "return": true_return, "env_steps": env_steps, "pairs_acked": acked,
            "wall_s": time.monotonic() - started, "history": history}


def check_seed(rule: Rule, seed: int) -> dict[str, Any]:
    """PARL, and beside it the ablation without the data-distribution term of the hypergradient."""
    result = train_parl(rule, seed=seed)
    ablation = train_parl(rule, seed=seed, overrides={"distribution_term": False})
    return ({k: v for k, v in result.items() if k != "history"} | {"final": result["history"][-1]}
            | {"without_distribution_term_return": ablation["return"]})


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_seeds(rule, seeds, lambda seed: check_seed(rule, seed))


RULE = Rule(
    name="parl", family="preference", paper_ids=("P001",),
    summary="PARL: bilevel alignment; the reward's hypergradient includes the lower-level (soft-optimal) policy's "
            "data-distribution term, on preferences over that policy's own segments",
    config_class=PARLConfig,
    options=CONTROL_OPTIONS + (
        Option("temperature", "entropy temperature of the lower-level policy", positive, "> 0"),
        Option("iterations", "outer (upper-level) iterations", positive, ">= 1"),
        Option("inner_steps", "Adam steps on the reward per outer iteration", positive, ">= 1"),
        Option("pairs_per_iteration", "labelled pairs per outer iteration", positive, ">= 1"),
        Option("distribution_term", "include the lower level's data-distribution term of the hypergradient",
               lambda x: isinstance(x, bool), "true or false"),
    ),
    learning_check=reach_check("P001", env_steps=50 * 16 * 16,
                               what="50 outer iterations of 16 lower-level episodes and 64 labelled pairs"),
    smoke_overrides={"iterations": 1, "episodes_per_iteration": 2, "pairs_per_iteration": 4, "inner_steps": 1,
                     "vi_iterations": 5, "eval_episodes": 4},
    check_runner="algorithms.preference.parl:run_learning_check",
)
