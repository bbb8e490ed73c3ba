"""On-policy and trust-region update rules."""
