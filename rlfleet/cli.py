"""The `rlfleet` command. Every mistake a user can make ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from rlfleet.errors import UserError

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what is wrong, what is valid), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="rlfleet", description="Distributed actor-learner RL: one update rule per paper.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = sub.add_parser("train", help="train a rule on an env; writes a run directory")
    train.add_argument("--algo", help="rule name (see `rlfleet algos`)")
    train.add_argument("--env", dest="env_id", help="gymnasium env id, e.g. CartPole-v1")
    train.add_argument("--stop-return", type=float, help="stop when the mean episode return reaches this")
    train.add_argument("--stop-steps", type=int, help="stop after this many env steps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a rule option (repeatable); `rlfleet algos` lists them")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=10, metavar="K", help="iterations between checkpoints")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    algos = sub.add_parser("algos", help="list the registered update rules, or every seed paper's status")
    algos.add_argument("--json", action="store_true")
    algos.add_argument("--papers", action="store_true", help="every paper of the catalogue with its status")

    evaluate = sub.add_parser("eval", help="mean and std of the greedy policy's return")
    evaluate.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    evaluate.add_argument("--episodes", type=int, default=10)
    evaluate.add_argument("--seed", type=int, default=0)

    serve = sub.add_parser("serve", help="serve policies over HTTP, or roll a checkpoint into a running server")
    serve.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    serve.add_argument("--name", help="policy name in URLs (default: the run's rule-env)")
    serve.add_argument("--version", help="version label (default: the next number); it becomes the latest")
    serve.add_argument("--policy", dest="more", action="append", default=[], metavar="NAME=PATH",
                       help="serve another policy too (repeatable)")
    serve.add_argument("--host", help="listen address of a new server (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port of a new server (default 8000)")
    serve.add_argument("--keep-versions", type=int, default=3, help="versions kept per name (default 3)")
    serve.add_argument("--max-batch-size", type=int, help="requests batched per forward pass (default 64)")
    serve.add_argument("--batch-wait-ms", type=float, help="wait for a batch to fill (default 0)")
    serve.add_argument("--max-ongoing-requests", type=int, help="per replica (default 256)")
    serve.add_argument("--replicas", type=int, help="replicas of the server (default 1)")
    serve.add_argument("--feedback", metavar="NAMESPACE",
                       help="also mount the human-feedback endpoint of this preference queue at /v1/feedback")
    serve.add_argument("--feedback-lease-s", type=float, default=300.0,
                       help="seconds a pair handed to a person stays theirs (default 300)")
    serve.add_argument("--text", action="append", default=[], metavar="NAME=RUN_DIR",
                       help="also serve a guided text policy at /v1/text/policies/NAME/generate (repeatable)")

    bench = sub.add_parser("bench", help="side-by-side benchmarks against a peer library")
    bench.add_argument("which", choices=["ppo-throughput", "replay", "sac", "serve", "preference"])
    bench.add_argument("--checkpoint", help="serve: run dir or checkpoint to serve (default: a fresh PPO CartPole)")
    bench.add_argument("--seconds", type=float, default=3.0, help="serve: measured seconds per level and round")
    bench.add_argument("--rounds", type=int, default=3, help="serve: rounds of bare/Serve pairs per level")
    bench.add_argument("--sweep", action="store_true", help="serve: also measure the other Serve settings")
    bench.add_argument("--steps", type=int, default=20480, help="ppo-throughput, sac: env steps per library")
    bench.add_argument("--transitions", type=int, default=50_000, help="replay: transitions inserted and sampled")
    bench.add_argument("--pairs", type=int, default=20_000, help="preference: pairs pushed through the queue")
    bench.add_argument("--learner-pairs-per-s", type=float, default=None,
                       help="preference: the learner's demand, for the queue capacity / demand ratio")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", dest="json_path", help="also write the result to this JSON file")

    verify = sub.add_parser("verify", help="run rules' learning checks; write docs/verification/<family>.md")
    which = verify.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", help="e.g. on-policy")
    which.add_argument("--all", action="store_true", help="every registered rule")
    which.add_argument("--algo", help="one rule")
    verify.add_argument("--seeds", type=int, default=1)
    verify.add_argument("--out-dir", default="docs/verification")
    verify.add_argument("--resume", action="store_true",
                        help="keep rows already measured with the same --seeds (<out-dir>/<family>.json or "
                             "<rule>.json); run the rest")

    comp = sub.add_parser("compare", help="train several rules on one task, same seeds; one picture + a table")
    comp.add_argument("--algos", required=True, help="comma-separated rule names, e.g. ppo,trpo")
    comp.add_argument("--env", dest="env_id", required=True)
    comp.add_argument("--steps", type=int, required=True, help="env steps per run")
    comp.add_argument("--seeds", type=int, default=3)
    comp.add_argument("--out-dir", default="runs/compare")
    comp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="an option every compared rule accepts (repeatable)")

    quick = sub.add_parser("quickstart", help="train PPO on CartPole-v1 to 450, serve it, query it (make run)")
    quick.add_argument("--runs-dir", default="runs")
    quick.add_argument("--stop-return", type=float, default=450.0)
    quick.add_argument("--stop-steps", type=int, default=300_000)
    quick.add_argument("--port", type=int, default=8000)
    add_job_parsers(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from algorithms.options import parse_overrides
    from cluster.train import train

    if args.resume and (args.algo or args.env_id):
        raise UserError("--resume continues a run with its own rule and env: drop --algo/--env")
    result = train(
        args.algo, args.env_id, stop_return=args.stop_return, stop_steps=args.stop_steps, seed=args.seed,
        runs_dir=args.runs_dir, overrides=parse_overrides(args.overrides), resume=args.resume,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
    )
    status = "interrupted" if result.interrupted else ("reached the return" if result.reached_return else "done")
    print(f"{status}: {result.env_steps} env steps, mean return {result.episode_return_mean:.1f}")
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    print(f"curve:         {result.run_dir / 'curve.png'}")
    return 0


def cmd_algos(args: argparse.Namespace) -> int:
    from algorithms.registry import RULES, rule_defaults
    from rlfleet.papers import paper_statuses, paper_title

    if args.papers:
        rows = paper_statuses()
        if args.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False))
            return 0
        for row in rows:
            print(f"{row['id']}  {row['status']:<12} {row['detail'][:48]:<48}  {row['title'][:70]}")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("implemented", "no rule", "not yet")}
        print(f"{len(rows)} papers: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return 0
    entries = []
    for rule in RULES.values():
        check = rule.learning_check
        entries.append({
            "name": rule.name, "family": rule.family, "summary": rule.summary,
            "papers": [{"id": pid, "title": paper_title(pid)} for pid in rule.paper_ids],
            "learning_check": {"env": check.env, "steps": check.steps, "threshold": check.threshold,
                               "score": check.score if rule.trains_on_env_steps else "own loop (see source)",
                               "source": check.source},
            "options": rule_defaults(rule),
        })
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    for e in entries:
        papers = "; ".join(f"{p['id']} {p['title']}" for p in e["papers"])
        check = e["learning_check"]
        print(f"{e['name']:<6} {e['family']:<13} {papers}")
        print(f"       {e['summary']}")
        what = {"train_window": "mean return of the last 100 training episodes",
                "greedy_eval": "mean return of greedy evaluation episodes"}.get(check["score"], "score")
        units = "env steps" if check["score"] in ("train_window", "greedy_eval") else "steps (pairs or env steps)"
        print(f"       learning check: {check['env']}, {what} >= {check['threshold']:g} within {check['steps']:,} "
              f"{units}")
        print("       options: " + ", ".join(f"{k}={v}" for k, v in e["options"].items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cluster.evaluate import evaluate

    result = evaluate(args.path, episodes=args.episodes, seed=args.seed)
    print(f"{result['env_id']}: mean return {result['mean']:.2f} +- {result['std']:.2f} over {result['episodes']} "
          "episodes (greedy policy)")
    return 0


def default_policy_name(path: str) -> str:
    from cluster.checkpoints import read_run_config, resolve_checkpoint, run_dir_of

    run_dir = run_dir_of(resolve_checkpoint(path))
    if run_dir is None:
        return "policy"
    cfg = read_run_config(run_dir)
    return f"{cfg['algo']}-{cfg['env']}".lower()


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    import ray

    from services.serving import ServeTuning, deploy_policies, leave_serving, shutdown_serving

    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    policies = {args.name or default_policy_name(args.path): args.path}
    for item in args.more:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--policy takes NAME=PATH, got {item!r}")
        policies[name] = path
    given = {"max_batch_size": args.max_batch_size, "max_ongoing_requests": args.max_ongoing_requests,
             "num_replicas": args.replicas,
             "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000}
    given = {k: v for k, v in given.items() if v is not None}
    # No tuning flag: a new server gets the defaults, a rollout keeps the running server's settings.
    tuning = ServeTuning(**given) if given else None
    first = next(iter(policies))
    extra = {}
    if args.feedback is not None:  # same API key as the policies (RLFLEET_API_KEY)
        from services.serving import FEEDBACK_PREFIX, feedback_app

        extra[FEEDBACK_PREFIX] = feedback_app(args.feedback, lease_s=args.feedback_lease_s)
    if args.text:
        from services.text_serving import TEXT_PREFIX, text_policies_app

        if any(not all(item.partition("=")[::2]) for item in args.text):
            raise UserError(f"--text takes NAME=RUN_DIR, got {args.text!r}")
        texts = dict(item.partition("=")[::2] for item in args.text)
        extra[TEXT_PREFIX] = text_policies_app(texts)
    done = deploy_policies(policies, host=args.host, port=args.port, tuning=tuning, keep_versions=args.keep_versions,
                           versions={first: args.version} if args.version else None, extra_apps=extra)
    what = ", ".join(f"{name!r} version {version}" for name, version in done.versions.items())
    if not done.started:  # a server already runs in this Ray cluster: the new versions are rolled in
        print(f"rolled {what} into the server at {done.url}; it answers {done.url}/v1/policies/{first}/act")
        leave_serving()
        return 0
    print(f"serving {what} at {done.url}/v1/policies/{first}/act and /value (Ctrl-C to stop)")
    for prefix in extra:
        print(f"  and {done.url}{prefix}")
    print(f"roll a new checkpoint in: RAY_ADDRESS={ray.get_runtime_context().gcs_address} "
          f"rlfleet serve RUN_DIR_OR_CHECKPOINT --name {first}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown_serving()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.steps <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if args.transitions < 256:
        raise UserError(f"--transitions must be >= 256 (one sample batch), got {args.transitions}")
    if args.which == "serve":
        from rlfleet.bench_serve import format_table, run_serve_bench

        result = run_serve_bench(checkpoint=args.checkpoint, seconds=args.seconds, rounds=args.rounds,
                                 sweep=args.sweep)
    elif args.which == "preference":
        from services.preferences.bench import format_table, run_preference_queue_bench

        result = run_preference_queue_bench(n=args.pairs, learner_pairs_per_s=args.learner_pairs_per_s)
    elif args.which == "sac":
        from rlfleet.bench_sac import format_table, run_sac_bench

        result = run_sac_bench(steps=args.steps, seed=args.seed)
    elif args.which == "replay":
        from services.replay.bench import format_table, run_replay_bench

        result = run_replay_bench(n=args.transitions, seed=args.seed)
    else:
        from rlfleet.bench import format_table, run_ppo_throughput

        result = run_ppo_throughput(steps=args.steps, seed=args.seed)
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rlfleet.verify import format_table, verify

    family = None if (args.all or args.algo) else args.family
    rows, path = verify(family, seeds=args.seeds, out_dir=args.out_dir, progress=True, only=args.algo,
                        resume=args.resume)
    print(format_table(rows, args.algo or family or "all rules"))
    print(f"table written to {path}")
    return 0 if all(r["passed"] for r in rows) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from algorithms.options import parse_overrides
    from rlfleet.compare import compare, format_table

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    summary = compare(algos, args.env_id, args.steps, args.seeds, out_dir=args.out_dir,
                      overrides=parse_overrides(args.overrides), progress=True)
    print(format_table(summary))
    print(f"picture: {summary['out_dir']}/compare.png   table: {summary['out_dir']}/compare.md")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from rlfleet.quickstart import quickstart

    quickstart(runs_dir=args.runs_dir, stop_return=args.stop_return, stop_steps=args.stop_steps, port=args.port)
    return 0


def add_job_parsers(sub: argparse._SubParsersAction) -> None:
    """`submit`, `jobs`, `logs`, `stop`: training runs as Ray Jobs on a cluster (rlfleet/jobs.py)."""
    address_help = "the head node's job server, e.g. http://HEAD:8265 (default: RAY_ADDRESS)"
    submit = sub.add_parser("submit", help="submit a training run to a Ray cluster as a Ray Job")
    submit.add_argument("--algo", required=True, help="rule name (see `rlfleet algos`)")
    submit.add_argument("--env", dest="env_id", required=True, help="gymnasium env id, e.g. CartPole-v1")
    submit.add_argument("--steps", type=int, help="stop after this many env steps")
    submit.add_argument("--stop-return", type=float, help="stop when the mean episode return reaches this")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a rule option (repeatable); `rlfleet algos` lists them")
    submit.add_argument("--checkpoint-every", type=int, default=10, metavar="K")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--working-dir", help="project directory uploaded with the job (default: this project)")
    submit.add_argument("--runs-dir", default=None,
                        help="run directories, a path on the head node (default: ~/rlfleet/runs)")
    submit.add_argument("--num-env-runners", type=int, help="EnvRunner actors (sets the rule option)")
    submit.add_argument("--num-learners", type=int, help="learner actors (0 = learn in the driver)")
    submit.add_argument("--gpus-per-learner", type=float, help="GPUs per learner")
    submit.add_argument("--follow", action="store_true", help="then stream the job's output until it ends")
    jobs = sub.add_parser("jobs", help="list the cluster's jobs: id, status, what, start and end")
    jobs.add_argument("--address", help=address_help)
    jobs.add_argument("--json", action="store_true")
    logs = sub.add_parser("logs", help="print a job's output; --follow streams it until the job ends")
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--address", help=address_help)
    stop = sub.add_parser("stop", help="stop a job (the run saves a final checkpoint first)")
    stop.add_argument("job_id", metavar="JOB")
    stop.add_argument("--address", help=address_help)


def cmd_submit(args: argparse.Namespace) -> int:
    from algorithms.options import parse_overrides
    from rlfleet import jobs

    overrides = jobs.with_resources(parse_overrides(args.overrides), args.num_env_runners, args.num_learners,
                                    args.gpus_per_learner)
    request = jobs.TrainingRequest(
        algo=args.algo, env_id=args.env_id, seed=args.seed, stop_steps=args.steps, stop_return=args.stop_return,
        overrides=tuple(overrides.items()), checkpoint_every=args.checkpoint_every,
        runs_dir=args.runs_dir or jobs.DEFAULT_RUNS_DIR,
    )
    jobs.check_request(request)
    cluster = jobs.connect(args.address)
    working_dir = Path(args.working_dir) if args.working_dir else jobs.default_working_dir()
    job_id, large = jobs.submit(cluster, request, working_dir)
    if large:
        print(f"left out of the upload (over {jobs.LARGE_FILE_BYTES >> 20} MiB): {', '.join(map(str, large))}")
    where = f" --address {cluster.url}"
    print(f"submitted {job_id} to {cluster.url}")
    print(f"follow it:  rlfleet logs {job_id} --follow{where}")
    print(f"stop it:    rlfleet stop {job_id}{where}")
    print(f"run dir:    under {request.runs_dir} on the head node (the job's output ends with its path)", flush=True)
    return cmd_logs(argparse.Namespace(job_id=job_id, follow=True, address=cluster.url)) if args.follow else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rlfleet import jobs

    rows = jobs.list_jobs(jobs.connect(args.address))
    print(json.dumps(rows, indent=1) if args.json else jobs.format_jobs(rows))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from rlfleet import jobs

    cluster = jobs.connect(args.address)
    if not args.follow:
        jobs.print_logs(cluster, args.job_id)
        return 0
    try:
        status, message = jobs.follow_logs(cluster, args.job_id)
    except KeyboardInterrupt:
        print(f"rlfleet: stopped following; {args.job_id} goes on (`rlfleet stop {args.job_id}` ends it)",
              file=sys.stderr)
        return 130
    print(f"job {args.job_id}: {status}" + (f" ({message})" if message and status != "SUCCEEDED" else ""),
          file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from rlfleet import jobs

    stopped, status = jobs.stop_job(jobs.connect(args.address), args.job_id)
    if stopped:
        print(f"stopping {args.job_id}: the run saves a final checkpoint, then the job ends as STOPPED")
    else:
        print(f"{args.job_id} already ended ({status}): nothing to stop")
    return 0


COMMANDS = {"train": cmd_train, "algos": cmd_algos, "eval": cmd_eval, "serve": cmd_serve, "bench": cmd_bench,
            "quickstart": cmd_quickstart, "verify": cmd_verify, "compare": cmd_compare}
COMMANDS.update(submit=cmd_submit, jobs=cmd_jobs, logs=cmd_logs, stop=cmd_stop)


def main(argv: Sequence[str] | None = None) -> int:
    from cluster.local import quiet_ray_logs

    args = build_parser().parse_args(argv)
    quiet_ray_logs()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"rlfleet: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("rlfleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: one line unless RLFLEET_DEBUG asks for the traceback
        if os.environ.get("RLFLEET_DEBUG"):
            raise
        print(f"rlfleet: internal error: {type(exc).__name__}: {exc} (RLFLEET_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
