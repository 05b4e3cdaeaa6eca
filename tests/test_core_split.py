"""StepCache: what the J problems of an outer step share through ``problem.cache``, in one process."""

from __future__ import annotations

import pytest

import itertools

from resalign.core.split import ONE_PROCESS, StepCache, balanced_owners, run_order


class _Counting:
    """ONE_PROCESS, counting the broadcasts."""

    def __init__(self):
        self.broadcasts = 0

    def __getattr__(self, name):
        return getattr(ONE_PROCESS, name)

    def start_broadcast(self, obj, src):
        self.broadcasts += 1
        return lambda: obj


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


def _makespan(costs, owners, processes):
    return max(sum(c for c, r in zip(costs, owners) if r == p) for p in range(processes))


def test_balanced_owners_spread_the_toy_pool_s_costs_better_than_j_mod_n():
    """The toy pool's simulations cost T = 30 or 60 passes, twice with prior pairs: against j ≡ r
    (mod 2) the balanced assignment never has a longer critical path, keeps the source (the cheapest)
    on rank 0, and is within Graham's 4/3 bound of the best assignment that pins the source (brute force)."""
    from resalign.core.split import source_of

    better = 0
    for costs in itertools.product([30, 60, 120], repeat=4):
        owners, source = balanced_owners(costs, 2), source_of(costs)
        assert owners[source] == 0
        mod = _makespan(costs, [j % 2 for j in range(4)], 2)
        best = min(_makespan(costs, pinned, 2) for pinned in itertools.product(range(2), repeat=4)
                   if pinned[source] == 0)
        ours = _makespan(costs, owners, 2)
        assert best <= ours <= min(mod, 4 / 3 * best)
        better += ours < mod
    assert better >= 30  # of the 81 cost patterns (34 measured)


def test_run_order_puts_the_source_first_then_the_longest():
    owners = [0, 1, 0, 0, 1]
    costs = [10, 40, 30, 50, 20]
    assert run_order(owners, costs, 0) == [0, 3, 2] and run_order(owners, costs, 1) == [1, 4]
    assert ONE_PROCESS.assign(costs) == ([0] * 5, [0, 1, 2, 3, 4])


def test_the_source_is_the_cheapest_simulation_and_runs_first():
    """The toy pool's costs of one outer step (T = 60 with prior pairs, T = 60, T = 30, T = 30): the
    source is the first T = 30 one, on rank 0 and first there, and in one process it runs first too."""
    from resalign.core.split import source_of

    costs = [120.0, 60.0, 30.0, 30.0]
    assert source_of(costs) == 2
    owners = balanced_owners(costs, 2)
    assert owners[2] == 0 and run_order(owners, costs, 0)[0] == 2
    assert ONE_PROCESS.assign(costs)[1] == [2, 0, 1, 3]
