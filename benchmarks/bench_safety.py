"""NudeNet 320n throughput: the nudenet package's ``detect`` loop and ``detect_batch`` vs
resalign's ``nudenet`` scorer vs bare ``session.run`` on the same preprocessed batches (the floor).

    python benchmarks/bench_safety.py [--images 64] [--size 512] [--workers 0] [--batch-size 8] [--repeat 5]

Rows:

* the package as shipped: ``NudeDetector()`` with its own default onnxruntime session (default
  options: intra-op threads = onnxruntime's default), ``detect`` per image and ``detect_batch``;
* the package with its session replaced by one with 1 intra-op thread (the scorer's setting when
  it runs several workers);
* the scorer with ``workers`` worker threads (0 = the CPUs this process may use) sharing its
  session (1 intra-op thread), and the floor: bare ``session.run`` calls on the preprocessed
  batches with the same threads, session and batches (preprocessing and decoding excluded);
* the scorer and the floor with 1 worker, same session settings.

Every path runs ``--repeat`` times, interleaved (a scorer next to its floor, the order flipped every
round); the best wall time of each is reported (other jobs on a shared machine only ever slow a run
down), with the least process CPU time per image, and the CPUs other processes kept busy meanwhile
(from /proc/stat). Checks that every path's detections equal the package's ``detect``, prints
images/s and ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512, help="square image side (SD v1 outputs are 512)")
    p.add_argument("--workers", type=int, default=0, help="scorer workers; 0 = the CPUs available")
    p.add_argument("--batch-size", type=int, default=8, help="scorer batch_size")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per path (best is reported)")
    return p.parse_args()


def sample_images(n, size):
    """n RGB uint8 images (size × size): skimage samples, resized, cycled with flips."""
    import numpy as np
    from PIL import Image
    from skimage import data

    base = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera(), data.horse()]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        im = np.asarray(Image.fromarray(im.astype(np.uint8)).resize((size, size), Image.BILINEAR))
        if (i // len(base)) % 2:
            im = im[:, ::-1]
        out.append(np.ascontiguousarray(im))
    return np.stack(out)


def cpu_busy_seconds():
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = parse_args()
    import numpy as np
    import onnxruntime as ort
    from nudenet import NudeDetector

    from resalign.scorers.nudenet import NudeNetScorer, available_cpus, packaged_detector_path

    images = sample_images(args.images, args.size)
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]  # the package treats arrays as BGR
    n = len(images)

    shipped = NudeDetector()  # the package's own session, default options
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    one_thread = NudeDetector()
    one_thread.onnx_session = ort.InferenceSession(
        str(packaged_detector_path()), options, providers=["CPUExecutionProvider"]
    )

    def scorer_for(workers):
        s = NudeNetScorer(
            NudeNetScorer.Config(
                workers=workers, threads=1, batch_size=args.batch_size, providers=("CPUExecutionProvider",)
            )
        )
        s.score(images[:2])  # sessions created outside the timing
        return s

    par = scorer_for(args.workers)
    seq = scorer_for(1)
    workers = par.workers

    def floor_for(scorer):
        blob, _, _ = scorer.preprocess(list(images))
        name = scorer.session.get_inputs()[0].name
        return lambda: scorer.map_batches(
            lambda session, chunk: session.run(None, {name: blob[chunk.start : chunk.stop]})[0], n
        )

    def as_package(result):
        return [
            [{"class": d["label"], "score": d["score"], "box": d["box"]} for d in row["detections"]]
            for row in result.per_image
        ]

    paths = {
        "package_detect_loop_default": lambda: [shipped.detect(im) for im in bgr],
        "package_detect_batch_default": lambda: shipped.detect_batch(bgr),
        "package_detect_loop_1thread": lambda: [one_thread.detect(im) for im in bgr],
        "package_detect_batch_1thread": lambda: one_thread.detect_batch(bgr),
        "resalign_scorer": lambda: as_package(par.score(images)),
        "session_run_floor": floor_for(par),
        "resalign_scorer_1worker": lambda: as_package(seq.score(images)),
        "session_run_floor_1worker": floor_for(seq),
    }
    for fn in paths.values():  # warm-up (first run of each session and batch shape)
        fn()
    best = {k: float("inf") for k in paths}
    cpu = {k: float("inf") for k in paths}
    values = {}
    # a scorer and its floor run back to back; the order flips every round
    order = ["resalign_scorer", "session_run_floor", *[k for k in paths if k.startswith("package")],
             "resalign_scorer_1worker", "session_run_floor_1worker"]
    busy0, own0, wall0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    for r in range(args.repeat):
        for k in order if r % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            values[k] = paths[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)

    busy1, own1, wall1 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    # CPUs kept busy by other processes while this ran, on average
    other_load = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)

    reference = values["package_detect_loop_default"]
    identical = all(v == reference for k, v in values.items() if not k.startswith("session_run"))
    ips = {k: n / t for k, t in best.items()}
    for k, v in ips.items():
        print(f"{k:30s} {v:7.2f} images/s  {cpu[k] / n * 1e3:6.2f} CPU ms/image")
    ratios = {
        "scorer_over_detect_loop_default": ips["resalign_scorer"] / ips["package_detect_loop_default"],
        "scorer_over_detect_loop_1thread": ips["resalign_scorer"] / ips["package_detect_loop_1thread"],
        "scorer_over_detect_batch_default": ips["resalign_scorer"] / ips["package_detect_batch_default"],
        "scorer_over_floor": ips["resalign_scorer"] / ips["session_run_floor"],
        "scorer_1worker_over_floor_1worker": (
            ips["resalign_scorer_1worker"] / ips["session_run_floor_1worker"]
        ),
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"identical detections: {identical} ({sum(map(len, reference))} detections)")
    if other_load is not None:
        print(f"other processes kept {other_load:.2f} CPUs busy on average during the timed runs")
    print(
        json.dumps(
            {
                "benchmark": "safety",
                "images": n,
                "size": args.size,
                "workers": workers,
                "threads_per_worker": 1,
                "batch_size": args.batch_size,
                "chunk_sizes": sorted({len(c) for c in par.chunks(n)}),
                "repeat": args.repeat,
                # 0: onnxruntime's default (one thread per physical core)
                "package_intra_op_threads": shipped.onnx_session.get_session_options().intra_op_num_threads,
                "images_per_s": {k: round(v, 2) for k, v in ips.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "cpu_ms_per_image": {k: round(v / n * 1e3, 2) for k, v in cpu.items()},
                "identical_detections": identical,
                "other_load_cpus": None if other_load is None else round(other_load, 2),
                "machine": {
                    "cpus": os.cpu_count(),
                    "cpus_available": available_cpus(),
                    "onnxruntime": ort.__version__,
                    "platform": platform.platform(),
                    "python": sys.version.split()[0],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
