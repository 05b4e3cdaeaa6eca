"""resalign.distributed with gloo and two CPU processes: item split, gathers and sums against the
single-process values computed here."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from resalign import distributed as D
from resalign.core.split import Ranks, StepCache
from resalign.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPTS = ["a red ring", "a blue square", "a green circle", "a red cross", "a blue ring"]


def _refuse() -> None:
    raise ConfigError("--out: rank 0 says no")


def _worker(r: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(r))
    assert D.init("cpu")
    try:
        mine = D.shard(list("abcde"))
        t = torch.tensor([float(r + 1), 10.0 * (r + 1)])
        D.all_reduce_sum([t])
        with D.solo():
            solo = (D.rank(), D.world_size(), D.my_indices(3))
        D.BUCKET_ELEMENTS = 5  # several buckets, a tensor larger than one, two dtypes
        many = [torch.arange(n, dtype=dtype) * (r + 1) for n, dtype in
                ((3, torch.float32), (4, torch.float64), (7, torch.float32), (1, torch.float32))]
        D.all_reduce_sum(many)
        try:
            D.on_main(_refuse)
            on_main_error = None
        except ConfigError as exc:
            on_main_error = str(exc)
        # the source stores its entry without waiting for rank 1, which looks it up 2 s later
        late = StepCache(Ranks())
        if r == 0:
            t0 = time.perf_counter()
            late.view(0)["lambda_max/hessian"] = 4.0
            source_waited_s, late_seen = time.perf_counter() - t0, None
            late.done(0)
        else:
            time.sleep(2.0)
            source_waited_s, late_seen = None, late.view(1)["lambda_max/hessian"]
        late.close()
        # StepCache over the ranks: equal costs give rank 0 j = 0, 2 and rank 1 j = 1, 3;
        # simulation 0 (rank 0) shares its first entry
        seen = []
        split = Ranks()
        assigned = split.assign([3.0, 1.0, 2.0, 2.0])
        for stored in (True, False, None):  # stored; dropped before storing; rank 1 never looks
            cache = StepCache(split)
            for j in split.assign([1.0] * 4)[1]:
                view = cache.view(j)
                if j == 0 and stored:
                    view["lambda_max/hessian"] = 5.0
                elif j != 0 and stored is not None:
                    seen.append(view.get("lambda_max/hessian"))
                cache.done(j)
            cache.close()
        # generation: split by batches and gathered; inside solo() whole in each rank
        from resalign.eval.scoring.generate import generate
        from resalign.models.toy import build_bundle

        bundle = build_bundle(seed=0, channels=(8, 16))
        counts: dict[str, int] = {}
        kw = {"steps": 1, "batch_size": 2, "seed": 3}
        split_images = generate(bundle, PROMPTS, distribute=True,
                                progress=lambda done, total: counts.update(split=total), **kw)
        with D.solo():
            solo_images = generate(bundle, PROMPTS, distribute=True,
                                   progress=lambda done, total: counts.update(solo=total), **kw)
        out[r] = {
            "solo": solo,
            "indices": D.my_indices(5),
            "items": [x for _, x in mine],
            "gathered": D.gather_items([(i, x.upper()) for i, x in mine], 5),
            "sum": t.tolist(),
            "bcast": D.broadcast_object({"from": r}),
            "main": D.is_main(),
            "many": [t.tolist() for t in many],
            "on_main_error": on_main_error,
            "seen": seen,
            "source_waited_s": source_waited_s,
            "late_seen": late_seen,
            "assigned": assigned,
            "after": D.all_gather_object(r),
            "generated": (split_images.tolist() == solo_images.tolist(), len(split_images), counts),  # still in step: every rank joined each broadcast once
        }
    finally:
        D.shutdown()


def test_two_gloo_ranks_split_gather_and_sum():
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    assert out[0]["indices"] == [0, 2, 4] and out[1]["indices"] == [1, 3]
    assert out[0]["items"] == ["a", "c", "e"] and out[1]["items"] == ["b", "d"]
    for r in (0, 1):
        assert out[r]["gathered"] == list("ABCDE")
        assert out[r]["sum"] == [3.0, 30.0]
        assert out[r]["bcast"] == {"from": 0}
    assert out[0]["main"] and not out[1]["main"]
    assert out[0]["solo"] == out[1]["solo"] == (0, 1, [0, 1, 2])
    for r in (0, 1):
        assert out[r]["many"] == [[3.0 * i for i in range(n)] for n in (3, 4, 7, 1)]
        assert out[r]["on_main_error"] == "--out: rank 0 says no"
        assert out[r]["after"] == [0, 1]
    # the source's store did not wait for rank 1's lookup 2 s later, which still received the entry
    assert out[0]["source_waited_s"] < 1.0 and out[1]["late_seen"] == 4.0
    assert out[0]["seen"] == [5.0, None]  # rank 0's j = 2
    # 5 images in batches of 2: rank 0 generates batches 0 and 2 (3 images), rank 1 batch 1 (2 images)
    assert out[0]["generated"] == (True, 5, {"split": 3, "solo": 5})
    assert out[1]["generated"] == (True, 5, {"split": 2, "solo": 5})
    assert out[1]["seen"] == [5.0, 5.0, None, None]  # rank 1's j = 1, 3
    # costs 3, 1, 2, 2: the source j = 1 (the cheapest) pinned to rank 0 (load 1), then j = 0 -> rank 1
    # (load 3), j = 2 -> rank 0 (load 3), j = 3 -> rank 0 (the tie to the lower rank)
    assert out[0]["assigned"] == ([1, 0, 0, 0], [1, 2, 3]) and out[1]["assigned"] == ([1, 0, 0, 0], [0])


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init("cpu") is False
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    assert D.my_indices(3) == [0, 1, 2]
    t = torch.ones(2)
    D.all_reduce_sum([t])
    assert t.tolist() == [1.0, 1.0]
    assert D.gather_items([(1, "b"), (0, "a")], 2) == ["a", "b"]
    assert D.local_device("cuda") == "cuda"


@pytest.mark.parametrize("var,value", [("WORLD_SIZE", "two"), ("WORLD_SIZE", "0"),
                                       ("RESALIGN_DIST_TIMEOUT_S", "-1")])
def test_bad_environment_is_a_config_error(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        D.init("cpu") if var == "WORLD_SIZE" else D.timeout_s()
