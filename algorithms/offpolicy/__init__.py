"""Off-policy rules trained from the Redis replay service (issue 4): DQN, SAC, TD3, DDPG."""
