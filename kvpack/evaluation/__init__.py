"""Quality evaluation: a codec's effect on a model's predictions, the literature's baselines, sweeps."""
