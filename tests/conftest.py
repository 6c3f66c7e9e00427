import os

from hypothesis import HealthCheck, settings

# Deterministic in CI (the same examples every run); widen locally with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
