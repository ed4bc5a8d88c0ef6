"""Ray Tune + Optuna search for MLFD (the only package that imports ray and optuna)."""
