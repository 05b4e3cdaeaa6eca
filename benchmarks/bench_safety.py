"""NudeNet 320n throughput: the nudenet package's ``detect`` loop and ``detect_batch`` vs
resalign's ``nudenet`` scorer vs bare ``session.run`` on the same preprocessed batch (the floor).

    python benchmarks/bench_safety.py [--images 64] [--size 512] [--ort-threads 1] [--batch-size 8]

Every path uses an onnxruntime session with the same thread settings. Checks that the scorer's
detections equal the package's, prints images/s and ratios, then one JSON line.
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
    p.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--batch-size", type=int, default=8)
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


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.ort_threads))
    import numpy as np
    import onnxruntime as ort
    from nudenet import NudeDetector

    from resalign.scorers.nudenet import NudeNetScorer, packaged_detector_path

    images = sample_images(args.images, args.size)
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]  # the package treats arrays as BGR
    n = len(images)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.ort_threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(packaged_detector_path()), options, providers=["CPUExecutionProvider"])
    detector = NudeDetector()
    detector.onnx_session = session  # same session settings for every path

    scorer = NudeNetScorer(NudeNetScorer.Config(threads=args.ort_threads, batch_size=args.batch_size))
    scorer.score(images[:2])  # create the session outside the timing

    # warm-up of the shared session
    detector.detect(bgr[0])

    t_loop, det_loop = timed(lambda: [detector.detect(im) for im in bgr])
    t_batch, det_batch = timed(lambda: detector.detect_batch(bgr))
    t_ours, result = timed(lambda: scorer.score(images))
    det_ours = [[{"class": d["label"], "score": d["score"], "box": d["box"]} for d in row["detections"]] for row in result.per_image]

    blob, _, _ = scorer.preprocess(list(images))
    name = session.get_inputs()[0].name
    bs = args.batch_size

    def floor():
        for start in range(0, n, bs):
            session.run(None, {name: blob[start : start + bs]})

    t_floor, _ = timed(floor)
    identical = det_ours == det_loop == det_batch
    ips = {
        "package_detect_loop": n / t_loop,
        "package_detect_batch": n / t_batch,
        "resalign_scorer": n / t_ours,
        "session_run_floor": n / t_floor,
    }
    for k, v in ips.items():
        print(f"{k:22s} {v:7.2f} images/s")
    ratios = {
        "scorer_over_detect_loop": ips["resalign_scorer"] / ips["package_detect_loop"],
        "scorer_over_detect_batch": ips["resalign_scorer"] / ips["package_detect_batch"],
        "scorer_over_floor": ips["resalign_scorer"] / ips["session_run_floor"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"identical detections: {identical} ({sum(map(len, det_ours))} detections)")
    print(
        json.dumps(
            {
                "benchmark": "safety",
                "images": n,
                "size": args.size,
                "ort_threads": args.ort_threads,
                "batch_size": bs,
                "images_per_s": {k: round(v, 2) for k, v in ips.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "identical_detections": identical,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
            }
        )
    )


if __name__ == "__main__":
    main()
