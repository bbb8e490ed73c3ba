"""The loop of the guided-decoding rules (GenARM P065, VAS P208): train a guide for a frozen SFT policy, decode.

    GenARM: SFT -> PairProducer (Ray actor, frozen SFT weights) --add--> preference queue --lease--> scripted
            judge --labelled--> driver: claim -> LearnerGroup.update (the ARM, a copy of the SFT policy) -> ack;
            then `arm_epochs - 1` shuffled replays of the acked pairs -> guide = the ARM; the strength is chosen
            on validation prompts (`select_strength`) unless `guide_strength` fixes it
    VAS:    SFT -> PairProducer (Ray actor, frozen SFT weights) --add--> preference queue --lease--> the reward
            labels each pair --labelled--> learner consumer: read, claim, keep (prompt, response, reward), ack
            -> fit the value model (TD(lambda)) -> guide = the value model

A `GuidedRun` holds the frozen base, the guide and how to combine them; `save_guided_run` writes it as a run
directory (`guided.json` + `base.safetensors` + `guide.safetensors`, no pickle) that `load_guided_run` and
the text serving endpoint (`services/text_serving.py`) read back. The learning check (`run_guided_check`)
scores guided decoding against the same decoding with the UNTRAINED guide at the same strength (the control) and
against the unguided SFT policy, under the scripted judge on held-out prompts; for GenARM it also reports the
ARM's Bradley-Terry accuracy on fresh pairs (`arm_accuracies`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from algorithms.common.guided_decoding import GUIDES, GuidedLM
from algorithms.common.sequence import build_causal_lm, one_torch_thread
from algorithms.preference.base import PreferenceConfig, learner_batch, make_config
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, CHECK_PAIRS, CHECK_TASK, WIN_RATE_THRESHOLD, check_row
from algorithms.preference.generation import RemotePairProducer, lm_state, sample_texts, win_rate
from algorithms.preference.loop import EVAL_SEED_OFFSET, SFT_DEMONSTRATIONS, redis_url, step_metrics
from algorithms.preference.sft import sft_train
from algorithms.rule import LearningCheck, Rule
from envs.text_tasks import ReverseDigits, make_task
from services.preferences import LabelledPair, Pair, PreferenceQueue

RUN_FILE = "guided.json"
BASE_FILE, GUIDE_FILE = "base.safetensors", "guide.safetensors"
RUN_FORMAT = 1
VALIDATION_SEED_OFFSET = 20_000  # validation prompts (settings chosen after training): a stream of their own
VALIDATION_PROMPTS = 256


def guided_check(paper_id: str) -> LearningCheck:
    return LearningCheck(
        env=CHECK_TASK, steps=CHECK_PAIRS, threshold=WIN_RATE_THRESHOLD,
        source=(f"{paper_id}: score = win rate of guided decoding against the same decoding with the UNTRAINED guide "
                f"(the control: what the guide learned, not decoding's sharpening), and guided decoding must also "
                f"beat the unguided SFT policy (the paper's win rate against the base model), both under the "
                f"scripted Bradley-Terry judge; the shared preference threshold 0.6, 9 SE above 0.5 on "
                f"{CHECK_EVAL_PROMPTS} held-out prompts"),
    )


@dataclass
class GuidedRun:
    """A frozen base LM and its guide: `decoder()` is the guided policy (a GuidedLM)."""

    kind: str
    lm: dict[str, Any]  # the base LM's config
    guide_lm: dict[str, Any]  # the guide's config (VAS: untied head)
    task: str
    base: torch.nn.Module
    guide: torch.nn.Module
    strength: float | None
    top_k: int | None = None
    pairs_acked: int = 0
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)  # strength -> validation win rate vs the control

    def decoder(self, strength: float | None = None, guide: torch.nn.Module | None = None) -> GuidedLM:
        return GuidedLM(self.base, guide or self.guide, self.kind, self.strength if strength is None else strength,
                        self.top_k)

    def untrained_guide(self) -> torch.nn.Module:
        """The guide before training (the control): GenARM's ARM starts as the base, VAS's value at zero."""
        if self.kind == "genarm":
            return self.base
        from algorithms.preference.vas import build_value_model

        return build_value_model(self.lm, self.base)


def train_guided(rule: Rule, task: str | None = None, steps: int = 24, seed: int = 0,
                 overrides: dict[str, Any] | None = None, queue: PreferenceQueue | None = None) -> GuidedRun:
    """Train the guide of `rule` ("genarm" or "vas") for `steps` steps of `pairs_per_step` pairs. Ray must be up."""
    config = make_config(rule, overrides, seed, text_task=task)  # refuse bad options before any work
    if rule.name == "genarm":
        with one_torch_thread():
            return _train_genarm(config, steps, seed, queue)
    if rule.name == "vas":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models on shared cores (see loop.train_preference)
        try:
            return _train_vas(config, steps, seed, queue)
        finally:
            torch.set_num_threads(threads)
    raise ValueError(f"rule {rule.name!r} is not a guided-decoding rule; known: {', '.join(GUIDES)}")


def _train_genarm(config: PreferenceConfig, steps: int, seed: int, queue: PreferenceQueue | None,
                  on_epoch: Callable[[int, torch.nn.Module], None] | None = None) -> GuidedRun:
    """SFT, then the ARM (a copy of the SFT policy in a LearnerGroup) learns from `steps` batches of SFT-sample pairs
    that pass through the queue (producer -> judge -> learner, acked after each update), then from `arm_epochs - 1`
    shuffled replays of those acked pairs. `on_epoch(epoch, arm)` sees the ARM after every pass (diagnostics)."""
    from algorithms.preference.rm_loop import judge_labeller, replay_epochs, stream_pairs, train_sft

    started = time.monotonic()
    task = make_task(config.text_task)
    base = train_sft(config, task, seed)  # the same SFT policy as loop.train_preference's for this seed
    base.requires_grad_(False)
    own_queue = queue is None
    queue = queue or PreferenceQueue(namespace=f"genarm-{uuid.uuid4().hex[:8]}")
    group = None
    history: list[float] = []

    def arm() -> torch.nn.Module:
        model = build_causal_lm(config.lm)
        model.load_state_dict(lm_state(group.get_weights()["default_policy"]))
        model.eval()
        return model.requires_grad_(False)

    def update(batch: list[LabelledPair]) -> None:
        metrics = step_metrics(group.update(batch=learner_batch(task, batch)))
        history.append(metrics.get("preference_loss", float("nan")))

    try:
        group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
        group.set_weights({"default_policy": {f"model.{k}": v.detach().numpy() for k, v in base.state_dict().items()}})
        group.foreach_learner(lambda learner: learner.reset_reference())  # logged margins are then vs the SFT policy
        pairs = stream_pairs(config, task, base, queue, judge_labeller(task, config.judge_beta, seed), steps, seed,
                             update)
        for epoch in range(1, config.arm_epochs + 1):
            if epoch > 1:  # one shuffled replay per call, so `on_epoch` sees every pass
                replay_epochs(pairs, 1, config.pairs_per_step, seed + epoch, update)
            if on_epoch is not None:
                on_epoch(epoch, arm())
        guide = arm()
    finally:
        if group is not None:
            group.shutdown()
        if own_queue:
            queue.drop()
    run = GuidedRun("genarm", dict(config.lm), dict(config.lm), config.text_task, base, guide,
                    config.guide_strength, None, len(pairs), 0.0, history)
    if config.guide_strength is None:
        run.strength, run.validation = select_strength(run, config.strength_grid, config.judge_beta,
                                                       config.temperature, seed)
    run.seconds = time.monotonic() - started
    return run


def validation_prompts(task: ReverseDigits, seed: int, n: int = VALIDATION_PROMPTS) -> list[str]:
    """Prompts for choosing settings after training: their own stream, apart from training and check prompts."""
    return task.prompts(n, np.random.default_rng(seed + VALIDATION_SEED_OFFSET))


def select_strength(run: GuidedRun, grid: Sequence[float], judge_beta: float, temperature: float,
                    seed: int) -> tuple[float, dict[str, float]]:
    """The strength of `grid` at which guided decoding wins most often against the untrained guide at the same
    strength, on validation prompts (never the check's). Returns it and every strength's validation win rate."""
    task = make_task(run.task)
    prompts = validation_prompts(task, seed)
    control = run.untrained_guide()
    scores = {}
    for s in grid:
        guided, untrained = run.decoder(strength=s), run.decoder(strength=s, guide=control)
        scores[f"{float(s):g}"] = win_rate(guided, untrained, task, prompts, judge_beta, temperature,
                                           seed + VALIDATION_SEED_OFFSET)["win_rate"]
    best = max(grid, key=lambda s: scores[f"{float(s):g}"])
    return float(best), scores


def reward_verdict(task: ReverseDigits):
    """The reward as a queue verdict: the response with the higher hidden score wins, equal scores tie."""
    def verdict(pair: Pair) -> int | str:
        first, second = (task.score(pair.prompt, r) for r in pair.responses)
        return "tie" if first == second else (0 if first > second else 1)

    return verdict


def _train_vas(config: PreferenceConfig, steps: int, seed: int, queue: PreferenceQueue | None) -> GuidedRun:
    from algorithms.preference.vas import build_value_model, fit_value

    started = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    task = make_task(config.text_task)
    base = build_causal_lm(config.lm)
    sft_train(base, task, task.demonstrations(SFT_DEMONSTRATIONS, config.sft_noise, rng), steps=config.sft_steps,
              seed=seed)
    base.requires_grad_(False)

    own_queue = queue is None
    queue = queue or PreferenceQueue(namespace=f"vas-{uuid.uuid4().hex[:8]}")
    producer = None
    samples: list[tuple[str, str, float]] = []
    acked = 0
    try:
        producer = RemotePairProducer.remote(config.lm, config.text_task, queue.namespace, redis_url(queue),
                                             config.temperature, seed)
        weights = {f"model.{k}": v.detach().numpy() for k, v in base.state_dict().items()}
        ray.get(producer.set_weights.remote(weights, 0))  # version 0 forever: only the frozen SFT policy samples
        judge, consumer = queue.judge("vas-reward"), queue.learner("vas-learner")
        verdict = reward_verdict(task)
        for step in range(steps):
            ray.get(producer.produce.remote(config.pairs_per_step))
            labelled = 0
            while labelled < config.pairs_per_step:
                got = judge.label_with(verdict, count=config.pairs_per_step - labelled, block_s=5.0)
                if got == 0:
                    raise RuntimeError(f"step {step}: only {labelled} of {config.pairs_per_step} pairs to score")
                labelled += got
            batch = consumer.claim(consumer.next_batch(config.pairs_per_step, min_idle_s=config.min_idle_s,
                                                       block_s=5.0))
            samples += [(p.pair.prompt, r, float(task.score(p.pair.prompt, r))) for p in batch
                        for r in p.pair.responses]
            acked += len(consumer.ack(batch).acked)
    finally:
        if producer is not None:
            ray.kill(producer)
        if own_queue:
            queue.drop()
    value = build_value_model(config.lm, base)
    losses = fit_value(value, task, samples, steps=config.value_steps, lam=config.td_lambda, lr=config.lr,
                       seed=seed)
    value.requires_grad_(False)
    return GuidedRun("vas", dict(config.lm), {**config.lm, "tie_word_embeddings": False}, config.text_task, base,
                     value, config.guide_strength, config.top_k, acked, time.monotonic() - started, losses)


def mean_reward(model: torch.nn.Module, task: ReverseDigits, prompts: Sequence[str], temperature: float,
                seed: int) -> float:
    texts = sample_texts(model, task, prompts, temperature, torch.Generator().manual_seed(seed))
    return float(np.mean([task.score(p, r) for p, r in zip(prompts, texts)]))


def evaluate_guided(run: GuidedRun, prompts: Sequence[str], judge_beta: float, temperature: float = 1.0,
                    seed: int = 0) -> dict[str, float]:
    """Guided decoding vs the unguided base (win rate, accuracies, mean task reward); the untrained guide at the
    same strength (the control) vs the base, and guided vs the control."""
    task = make_task(run.task)
    guided, control = run.decoder(), run.decoder(guide=run.untrained_guide())
    out = win_rate(guided, run.base, task, prompts, judge_beta, temperature, seed)
    out["control_win_rate"] = win_rate(control, run.base, task, prompts, judge_beta, temperature, seed)["win_rate"]
    # What training the guide added: guided vs the untrained guide at the same strength (0.5 = nothing).
    out["win_rate_vs_control"] = win_rate(guided, control, task, prompts, judge_beta, temperature, seed)["win_rate"]
    out["guided_reward"] = mean_reward(guided, task, prompts, temperature, seed + 1)
    out["base_reward"] = mean_reward(run.base, task, prompts, temperature, seed + 1)
    if run.kind == "genarm":
        out.update(arm_accuracies(run, task, prompts, temperature, seed + 2))
    return out


def arm_accuracies(run: GuidedRun, task: ReverseDigits, prompts: Sequence[str], temperature: float,
                   seed: int) -> dict[str, float]:
    """Bradley-Terry accuracy against the hidden score on fresh pairs of SFT samples (never trained on): the trained
    ARM, the untrained ARM (the SFT likelihood), and what training added (log pi_r - log pi_SFT)."""
    from algorithms.preference.genarm import arm_accuracy

    gen = torch.Generator().manual_seed(seed)
    first, second = (sample_texts(run.base, task, prompts, temperature, gen) for _ in range(2))
    out = {}
    for name, model, minus in (("arm", run.guide, None), ("untrained_arm", run.base, None),
                               ("arm_learned", run.guide, run.base)):
        acc = arm_accuracy(model, task, prompts, first, second, minus)
        out[f"{name}_accuracy"], out[f"{name}_accuracy_se"] = acc["accuracy"], acc["accuracy_se"]
    out["arm_scored_pairs"] = acc["scored_pairs"]
    return out


def run_guided_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    """`rule.learning_check` per seed: train the guide on its budget of pairs, then guided decoding vs the SFT
    policy on CHECK_EVAL_PROMPTS held-out prompts. A row in `rlfleet verify`'s format ("return" = win rate)."""
    from cluster.local import ensure_ray

    ensure_ray(num_cpus=2)
    check = rule.learning_check
    config = rule.config_class()
    steps = -(-check.steps // config.pairs_per_step)
    per_seed = []
    for seed in range(seeds):
        run = train_guided(rule, task=check.env, steps=steps, seed=seed)
        eval_start = time.monotonic()
        prompts = make_task(run.task).prompts(CHECK_EVAL_PROMPTS, np.random.default_rng(seed + EVAL_SEED_OFFSET))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            evaluation = evaluate_guided(run, prompts, config.judge_beta, config.temperature, seed)
        finally:
            torch.set_num_threads(threads)
        wall = run.seconds + time.monotonic() - eval_start
        # Both must hold: guided decoding beats the base, and the trained guide beats the untrained one at the same
        # strength (else the gain is decoding's sharpening, not what the guide learned from the pairs).
        score = evaluation["win_rate_vs_control"]
        reached = score >= check.threshold and evaluation["win_rate"] >= check.threshold
        per_seed.append({"seed": seed, "reached": bool(reached), "return": score, "env_steps": run.pairs_acked,
                         "wall_s": wall, "guide_strength": run.strength, **evaluation,
                         **({"validation_win_rates_vs_control": run.validation} if run.validation else {})})
    return check_row(rule, per_seed)


# ---- run directories: JSON + safetensors, nothing pickled ------------------------------------------------------


def save_guided_run(run: GuidedRun, directory: str | Path) -> Path:
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(run.base, str(directory / BASE_FILE))  # save_model copes with GPT-2's tied embeddings
    save_model(run.guide, str(directory / GUIDE_FILE))
    meta = {"format": RUN_FORMAT, "kind": run.kind, "lm": run.lm, "guide_lm": run.guide_lm, "task": run.task,
            "strength": run.strength, "top_k": run.top_k}
    (directory / RUN_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def _lm_config(meta: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    spec = meta.get(key)
    # Only architecture configs: a "path" would make a run directory point at arbitrary weights elsewhere.
    if not isinstance(spec, dict) or not isinstance(spec.get("model_type"), str) or "path" in spec:
        raise ValueError(f"{where}: {key!r} must be an LM config object with a 'model_type' and no 'path'")
    if not all(isinstance(v, (str, int, float, bool)) for v in spec.values()):
        raise ValueError(f"{where}: {key!r} may only hold scalar values")
    return spec


def load_guided_run(directory: str | Path) -> GuidedRun:
    """A run directory written by `save_guided_run` back as a GuidedRun (ValueError naming what is wrong)."""
    from safetensors.torch import load_model

    directory = Path(directory)
    meta_path = directory / RUN_FILE
    if not meta_path.is_file():
        raise ValueError(f"{directory} is not a guided-decoding run directory: {RUN_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
        raise ValueError(f"{meta_path}: expected a JSON object with format {RUN_FORMAT}")
    kind, strength, top_k = meta.get("kind"), meta.get("strength"), meta.get("top_k")
    if kind not in GUIDES:
        raise ValueError(f"{meta_path}: kind must be one of {', '.join(GUIDES)}, got {kind!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
        raise ValueError(f"{meta_path}: strength must be a number >= 0, got {strength!r}")
    if kind == "vas" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{meta_path}: top_k must be an integer >= 1, got {top_k!r}")
    task = meta.get("task")
    if not isinstance(task, str):
        raise ValueError(f"{meta_path}: task must be a task name, got {task!r}")
    make_task(task)  # ValueError naming the known tasks
    lm, guide_lm = _lm_config(meta, "lm", meta_path), _lm_config(meta, "guide_lm", meta_path)
    models = []
    for spec, name in ((lm, BASE_FILE), (guide_lm, GUIDE_FILE)):
        model = build_causal_lm(spec)
        try:
            load_model(model, str(directory / name), strict=True)
        except Exception as exc:  # missing file, wrong shapes or keys: say which file
            raise ValueError(f"{directory / name}: cannot load weights: {type(exc).__name__}: {exc}") from None
        model.eval()
        model.requires_grad_(False)
        models.append(model)
    return GuidedRun(kind, lm, guide_lm, task, models[0], models[1], float(strength), top_k)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m algorithms.preference.guided_loop {genarm,vas} OUT_DIR: train a guide, save a run directory."""
    import argparse

    from algorithms.registry import get_rule
    from cluster.local import ensure_ray

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("rule", choices=GUIDES)
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ensure_ray(num_cpus=2)
    run = train_guided(get_rule(args.rule), steps=args.steps, seed=args.seed)
    print(save_guided_run(run, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
