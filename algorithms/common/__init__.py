"""Math several papers share: advantage estimators, policy/value losses, divergences, second-order solvers."""
