"""The ``nudenet`` scorer's worker threads change nothing in its output, order included."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nudenet")
import cv2  # noqa: E402
from fixtures.pictures import samples  # noqa: E402

from resalign.errors import ConfigError, DataError  # noqa: E402
from resalign.scorers.nudenet import NudeNetScorer, available_cpus  # noqa: E402


@pytest.fixture(scope="module")
def images():
    """13 distinct pictures of varied sizes (a prime count, so batches come out uneven)."""
    rng = np.random.default_rng(1)
    pics = samples()
    out = [pics[name] for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse")]
    out += [np.ascontiguousarray(im[:, ::-1]) for im in out[:4]]  # mirrored: other detections
    out += [
        rng.integers(0, 256, size=(300, 90, 3), dtype=np.uint8),
        np.ascontiguousarray(out[0][100:400, 50:300]),
        np.ascontiguousarray(out[1][::2, ::2]),
    ]
    return out


@pytest.fixture(scope="module")
def files(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nudenet-workers")
    paths = []
    for i, im in enumerate(images):
        path = folder / f"{i:02d}.png"
        cv2.imwrite(str(path), im[..., ::-1])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(images):
    """One worker, one image per session.run."""
    return NudeNetScorer(NudeNetScorer.Config(workers=1, threads=1, batch_size=1)).detect(images)


@pytest.mark.parametrize("workers,batch_size", [(2, 8), (3, 1), (3, 2), (4, 5), (16, 8)])
def test_workers_give_the_single_worker_output(images, files, reference, workers, batch_size):
    scorer = NudeNetScorer(NudeNetScorer.Config(workers=workers, threads=1, batch_size=batch_size))
    assert sum(map(len, reference)) >= 4  # some pictures do produce detections
    assert len({len(r) for r in reference}) > 1  # and not all the same number: order matters
    assert scorer.detect(images) == reference
    assert scorer.detect_files(files) == reference
    sequential = NudeNetScorer(NudeNetScorer.Config(workers=1, threads=1, batch_size=batch_size))
    ours, theirs = scorer.score_files(files), sequential.score_files(files)
    assert ours.per_image == theirs.per_image and ours.value == theirs.value
    assert [r["path"] for r in ours.per_image] == [str(p) for p in files]


def test_chunks_cover_every_image_once_in_order():
    scorer = NudeNetScorer(NudeNetScorer.Config(workers=3, batch_size=8))
    for n in (0, 1, 2, 3, 7, 13, 24, 25, 100):
        chunks = scorer.chunks(n)
        assert [i for c in chunks for i in c] == list(range(n))
        assert all(1 <= len(c) <= 8 for c in chunks)
        if n >= 3:
            assert len(chunks) >= 3  # every worker gets a batch
    assert [len(c) for c in scorer.chunks(64)] == [8] * 8
    assert [len(c) for c in scorer.chunks(7)] == [3, 3, 1]


def test_worker_defaults():
    auto = NudeNetScorer(NudeNetScorer.Config(providers=("CPUExecutionProvider",)))
    assert auto.workers == available_cpus() >= 1
    assert auto.intra_op_threads == (1 if auto.workers > 1 else 0)
    assert auto.details()["workers"] == auto.workers
    one = NudeNetScorer(NudeNetScorer.Config(workers=1))
    assert one.intra_op_threads == 0
    assert NudeNetScorer(NudeNetScorer.Config(workers=2, threads=3)).intra_op_threads == 3


def test_map_batches_runs_on_several_threads_in_order():
    import threading

    scorer = NudeNetScorer(NudeNetScorer.Config(workers=3, batch_size=2))
    barrier = threading.Barrier(3, timeout=30)  # passes only if 3 batches run at the same time

    def fn(session, chunk):
        if chunk.start < 6:
            barrier.wait()
        return list(chunk), threading.get_ident(), session

    out = scorer.map_batches(fn, 11)
    assert [i for ids, _, _ in out for i in ids] == list(range(11))
    assert len({tid for _, tid, _ in out[:3]}) == 3
    assert all(s is scorer.session for _, _, s in out)


def test_worker_errors_reach_the_caller(files):
    scorer = NudeNetScorer(NudeNetScorer.Config(workers=3, threads=1, batch_size=1))
    with pytest.raises(DataError, match="cannot read"):
        scorer.detect_files([*files[:4], "/nonexistent/image.png", *files[4:6]])
    assert scorer.detect_files(files[:2]) == scorer.detect_files(files)[:2]  # still usable
    with pytest.raises(ConfigError, match="workers"):
        NudeNetScorer.make({"workers": -1})


@pytest.mark.parametrize("bgr", [False, True])
def test_preprocess_equals_blob_from_images(images, bgr):
    """The numpy blob is cv2.dnn.blobFromImages' bit for bit (pad, resize, swap, /255)."""
    rng = np.random.default_rng(2)
    shapes = [(320, 320, 3), (321, 319, 3), (5, 700, 3)]
    extra = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in shapes]
    batch = [*images, *extra, images[0][:, ::-1]]  # last: a non-contiguous view
    scorer = NudeNetScorer(NudeNetScorer.Config(workers=1))
    blob, sizes, pads = scorer.preprocess(batch, bgr=bgr)
    assert blob.dtype == np.float32 and blob.shape == (len(batch), 3, 320, 320)
    for k, im in enumerate(batch):
        h, w = im.shape[:2]
        side = max(h, w)
        square = np.zeros((side, side, 3), dtype=np.uint8)
        square[:h, :w] = im
        expected = cv2.dnn.blobFromImage(
            square, 1 / 255.0, (320, 320), (0, 0, 0), swapRB=not bgr, crop=False
        )
        np.testing.assert_array_equal(blob[k], expected[0])
        assert tuple(sizes[k]) == (w, h) and tuple(pads[k]) == (side - w, side - h)
