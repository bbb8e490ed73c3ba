"""`make run`: train PPO on CartPole-v1, serve the checkpoint with Ray Serve, query it once over HTTP."""

from __future__ import annotations

import json
import socket
import urllib.request

import gymnasium as gym

from cluster.train import CURVE_FILE, train

POLICY_NAME = "cartpole"


def free_port(preferred: int) -> int:
    """`preferred` if nothing listens there, else any free port (so a busy 8000 does not end the demo)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def quickstart(runs_dir: str = "runs", stop_return: float = 450.0, stop_steps: int = 300_000, port: int = 8000) -> dict:
    from services.serving import serve_policies, shutdown_serving

    print(f"1/3 training PPO on CartPole-v1 until the mean return reaches {stop_return:g} (cap {stop_steps} steps)")
    result = train("ppo", "CartPole-v1", stop_return=stop_return, stop_steps=stop_steps, runs_dir=runs_dir)
    print(f"    {result.env_steps} env steps, mean return {result.episode_return_mean:.1f}, checkpoint {result.checkpoint}")

    port = free_port(port)
    print(f"2/3 serving the checkpoint with Ray Serve on port {port}")
    base_url = serve_policies({POLICY_NAME: str(result.run_dir)}, port=port)
    try:
        observation, _ = gym.make("CartPole-v1").reset(seed=0)
        body = {"observations": [observation.tolist()], "deterministic": True}
        url = f"{base_url}/v1/policies/{POLICY_NAME}/act"
        print(f"3/3 POST {url} {json.dumps(body)}")
        answer = post_json(url, body)
        value = post_json(f"{base_url}/v1/policies/{POLICY_NAME}/value", {"observations": body["observations"]})
    finally:
        shutdown_serving()
    print(f"    answer: {json.dumps(answer)}   value: {json.dumps(value)}")
    print(f"run directory:  {result.run_dir}")
    print(f"learning curve: {result.run_dir / CURVE_FILE}")
    return {"answer": answer, "value": value, "run_dir": str(result.run_dir)}
