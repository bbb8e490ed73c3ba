"""rlfleet: a distributed actor-learner RL training service (one update rule per paper)."""

__version__ = "0.1.0"
