"""Hypothesis settings for the fuzzers: bounded, so the folder runs in well under a minute.

``OPTSYNC_FUZZ_EXAMPLES`` raises the number of examples for a longer local hunt (the default
keeps ``make test`` short). Under CI the run is derandomized: a failure there reproduces on the
next run instead of flickering, while local runs keep exploring new inputs and keep what they
find in ``.hypothesis/``. No deadline: on a busy 2-core machine a slow example is not a bug.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "optsync-fuzz",
    max_examples=int(os.environ.get("OPTSYNC_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("optsync-fuzz")
