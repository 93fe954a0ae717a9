"""Distribution shift for benchmarks: CIFAR-10-C corruptions, their disk cache, and test streams.

:mod:`.corruptions` corrupts uint8 image batches (15 corruptions x 5 severities, seeded),
:mod:`.cache` keeps generated sets on disk outside git, :mod:`.streams` orders them into the
``iid``, ``continual``, ``correlated`` and ``mixed`` settings, :mod:`.figure` draws the
docs overview image.
"""
