"""StepCache: what the J problems of an outer step share through ``problem.cache``, in one process."""

from __future__ import annotations

import pytest

from resalign.core.split import ONE_PROCESS, StepCache


class _Counting:
    """ONE_PROCESS, counting the broadcasts."""

    def __init__(self):
        self.broadcasts = 0

    def __getattr__(self, name):
        return getattr(ONE_PROCESS, name)

    def broadcast(self, obj, src):
        self.broadcasts += 1
        return obj


def test_simulation_zero_s_first_entry_is_shared_and_the_others_keep_their_own():
    split = _Counting()
    cache = StepCache(split)
    v0 = cache.view(0)
    assert "lambda_max/hessian" not in v0
    v0["lambda_max/hessian"] = 7.0
    v0["other"] = 1.0  # only the first entry of simulation 0 is shared
    cache.done(0)
    v1, v2 = cache.view(1), cache.view(2)
    assert v1["lambda_max/hessian"] == 7.0 and "other" not in v1
    v1["lambda_max/hessian"] = 3.0  # simulation 1's own value does not reach simulation 2
    assert v1["lambda_max/hessian"] == 3.0 and v2["lambda_max/hessian"] == 7.0
    cache.close()
    assert split.broadcasts == 1


def test_nothing_is_shared_when_simulation_zero_stored_nothing():
    split = _Counting()
    cache = StepCache(split)
    cache.done(0)  # dropped before its solve
    v1 = cache.view(1)
    with pytest.raises(KeyError):
        v1["lambda_max/hessian"]
    v1["lambda_max/hessian"] = 2.0
    assert "lambda_max/hessian" not in cache.view(2)
    cache.close()
    assert split.broadcasts == 1
