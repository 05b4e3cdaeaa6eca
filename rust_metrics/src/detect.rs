//! Post-processing of YOLOv8-style detector outputs for a whole batch, matching the `nudenet`
//! package (3.4) exactly.
//!
//! The raw output has shape (B, 4 + C, A): for every anchor a box (cx, cy, w, h) in model-input
//! pixels and C class scores. Per image, as `nudenet.nudenet._postprocess` does:
//!
//! 1. keep anchors whose top class score is ≥ `conf_threshold` (0.2), class = first argmax;
//! 2. decode in float32: x = cx − w/2, y = cy − h/2, then scale every coordinate by
//!    (W + x_pad) / model_width horizontally and (H + y_pad) / model_height vertically (the image
//!    was padded bottom/right to a square before resizing), clip x, y into [0, W], [0, H] and
//!    w, h to the image;
//! 3. class-agnostic non-maximum suppression as OpenCV's `cv2.dnn.NMSBoxes(boxes, scores, 0.25,
//!    0.45)` on `Rect2d` boxes: candidates with score > `score_threshold`, stable-sorted by
//!    descending score (ties keep anchor order); a candidate is kept when its overlap
//!    1 − float(1 − IoU) with every kept box is ≤ `iou_threshold` (IoU in double, as
//!    `cv::jaccardDistance`);
//! 4. boxes truncated toward zero to integers, in the kept order.

use crate::error::{invalid, shape, Result};

/// Thresholds and model input size; the defaults are those of the nudenet package.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeParams {
    pub model_width: u32,
    pub model_height: u32,
    pub conf_threshold: f32,
    pub score_threshold: f32,
    pub iou_threshold: f32,
}

impl Default for DecodeParams {
    fn default() -> Self {
        Self {
            model_width: 320,
            model_height: 320,
            conf_threshold: 0.2,
            score_threshold: 0.25,
            iou_threshold: 0.45,
        }
    }
}

/// Original size of an image and the bottom/right padding that made it square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Letterbox {
    pub width: i64,
    pub height: i64,
    pub x_pad: i64,
    pub y_pad: i64,
}

/// One kept detection: image index in the batch, class index, score and [x, y, w, h] box in
/// original-image pixels (truncated to integers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub image: usize,
    pub class_id: usize,
    pub score: f32,
    pub bbox: [i64; 4],
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    class_id: usize,
    score: f32,
    /// x, y, w, h after decoding, each exactly a float32 value
    rect: [f32; 4],
}

/// Python's `min(a, b)`: `b` only when `b < a` (so a NaN `a` is returned as is).
fn py_min(a: f32, b: f32) -> f32 {
    if b < a {
        b
    } else {
        a
    }
}

/// Python's `max(a, b)`: `b` only when `b > a`.
fn py_max(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// `1 − cv::jaccardDistance(a, b)` computed as OpenCV's `rectOverlap` for `Rect2d`.
fn rect_overlap(a: &[f64; 4], b: &[f64; 4]) -> f32 {
    let area_a = a[2] * a[3];
    let area_b = b[2] * b[3];
    let distance = if area_a + area_b <= f64::EPSILON {
        0.0
    } else {
        let x1 = if a[0] < b[0] { b[0] } else { a[0] };
        let y1 = if a[1] < b[1] { b[1] } else { a[1] };
        let right = (a[0] + a[2]).min(b[0] + b[2]);
        let bottom = (a[1] + a[3]).min(b[1] + b[3]);
        let (w, h) = (right - x1, bottom - y1);
        let inter = if w <= 0.0 || h <= 0.0 { 0.0 } else { w * h };
        1.0 - inter / (area_a + area_b - inter)
    };
    1.0f32 - distance as f32
}

/// Indices into `candidates` kept by `cv::dnn::NMSBoxes` (eta = 1, top_k = 0), in kept order.
fn nms(candidates: &[Candidate], score_threshold: f32, iou_threshold: f32) -> Vec<usize> {
    let mut order: Vec<usize> =
        (0..candidates.len()).filter(|&i| candidates[i].score > score_threshold).collect();
    // Stable: equal scores keep their anchor order, as std::stable_sort in OpenCV.
    order.sort_by(|&i, &j| candidates[j].score.partial_cmp(&candidates[i].score).unwrap());
    let rects: Vec<[f64; 4]> =
        candidates.iter().map(|c| c.rect.map(f64::from)).collect();
    let mut kept: Vec<usize> = Vec::new();
    for idx in order {
        if kept.iter().all(|&k| rect_overlap(&rects[idx], &rects[k]) <= iou_threshold) {
            kept.push(idx);
        }
    }
    kept
}

/// Decode and suppress the detections of one image; `output` is the (4 + C, A) slab of it.
fn decode_image(
    output: &[f32],
    classes: usize,
    anchors: usize,
    lb: &Letterbox,
    p: &DecodeParams,
) -> Vec<Candidate> {
    let (w_img, h_img) = (lb.width as f32, lb.height as f32);
    let x_scale = (lb.width + lb.x_pad) as f32;
    let y_scale = (lb.height + lb.y_pad) as f32;
    let (mw, mh) = (p.model_width as f32, p.model_height as f32);
    let at = |channel: usize, a: usize| output[channel * anchors + a];
    let mut out = Vec::new();
    'anchors: for a in 0..anchors {
        let mut best = at(4, a);
        let mut class_id = 0;
        for c in 0..classes {
            let v = at(4 + c, a);
            if v.is_nan() {
                continue 'anchors; // numpy.amax is NaN, and NaN >= threshold is false
            }
            if v > best {
                best = v;
                class_id = c;
            }
        }
        if !(best >= p.conf_threshold) {
            continue;
        }
        let (cx, cy, w, h) = (at(0, a), at(1, a), at(2, a), at(3, a));
        let x = (cx - w / 2.0) * x_scale / mw;
        let y = (cy - h / 2.0) * y_scale / mh;
        let w = w * x_scale / mw;
        let h = h * y_scale / mh;
        let x = py_max(0.0, py_min(x, w_img));
        let y = py_max(0.0, py_min(y, h_img));
        let w = py_min(w, w_img - x);
        let h = py_min(h, h_img - y);
        out.push(Candidate { class_id, score: best, rect: [x, y, w, h] });
    }
    out
}

/// Post-process a batch of YOLOv8 outputs, (B, 4 + C, A) row-major in `output`.
///
/// Returns every kept detection, grouped by image in batch order and, within an image, in the
/// order NMS keeps them (descending score).
pub fn decode_yolov8(
    output: &[f32],
    shape_bca: [usize; 3],
    letterboxes: &[Letterbox],
    params: &DecodeParams,
) -> Result<Vec<Detection>> {
    let [batch, channels, anchors] = shape_bca;
    if channels < 5 {
        return shape(format!(
            "output must have shape (batch, 4 + classes, anchors) with at least one class; \
             got {channels} channels"
        ));
    }
    if output.len() != batch * channels * anchors {
        return shape("output buffer length does not match its shape");
    }
    if letterboxes.len() != batch {
        return shape(format!(
            "sizes and pads must have one row per image: output has {batch} images, \
             got {} rows",
            letterboxes.len()
        ));
    }
    for (i, lb) in letterboxes.iter().enumerate() {
        if lb.width <= 0 || lb.height <= 0 || lb.x_pad < 0 || lb.y_pad < 0 {
            return shape(format!(
                "image {i}: sizes must be positive and pads non-negative, got width={}, \
                 height={}, x_pad={}, y_pad={}",
                lb.width, lb.height, lb.x_pad, lb.y_pad
            ));
        }
    }
    if params.model_width == 0 || params.model_height == 0 {
        return invalid("model_size must be positive");
    }
    for (name, v) in [
        ("conf_threshold", params.conf_threshold),
        ("score_threshold", params.score_threshold),
        ("iou_threshold", params.iou_threshold),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return invalid(format!("{name} must lie in [0, 1], got {v}"));
        }
    }
    let classes = channels - 4;
    let per_image = channels * anchors;
    let mut detections = Vec::new();
    for (b, lb) in letterboxes.iter().enumerate() {
        let slab = &output[b * per_image..(b + 1) * per_image];
        let candidates = decode_image(slab, classes, anchors, lb, params);
        for k in nms(&candidates, params.score_threshold, params.iou_threshold) {
            let c = &candidates[k];
            detections.push(Detection {
                image: b,
                class_id: c.class_id,
                score: c.score,
                bbox: c.rect.map(|v| v as i64),
            });
        }
    }
    Ok(detections)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a (1, 4 + classes, anchors) output from per-anchor (box, scores).
    fn output(rows: &[([f32; 4], Vec<f32>)], classes: usize) -> Vec<f32> {
        let anchors = rows.len();
        let mut out = vec![0.0f32; (4 + classes) * anchors];
        for (a, (bx, scores)) in rows.iter().enumerate() {
            for k in 0..4 {
                out[k * anchors + a] = bx[k];
            }
            for c in 0..classes {
                out[(4 + c) * anchors + a] = scores[c];
            }
        }
        out
    }

    #[test]
    fn keeps_best_of_overlapping_boxes_and_decodes_to_original_pixels() {
        // A 160 × 80 image padded to 160 × 160: both axes scale by 160 / 320 = 0.5.
        let lb = Letterbox { width: 160, height: 80, x_pad: 0, y_pad: 80 };
        let rows = vec![
            ([100.0, 60.0, 40.0, 20.0], vec![0.1, 0.9]),  // kept
            ([102.0, 61.0, 40.0, 20.0], vec![0.8, 0.3]),  // IoU > 0.45 with row 0: suppressed
            ([250.0, 100.0, 20.0, 20.0], vec![0.6, 0.0]), // separate: kept
            ([20.0, 20.0, 10.0, 10.0], vec![0.22, 0.1]),  // >= 0.2 but not > 0.25: dropped by NMS
            ([50.0, 50.0, 10.0, 10.0], vec![0.1, 0.15]),  // below 0.2: dropped
        ];
        let out = output(&rows, 2);
        let dets = decode_yolov8(&out, [1, 6, 5], &[lb], &DecodeParams::default()).unwrap();
        assert_eq!(dets.len(), 2);
        assert_eq!((dets[0].class_id, dets[0].score), (1, 0.9));
        // x = (100 - 20) * 0.5 = 40, y = (60 - 10) * 0.5 = 25, w = 20, h = 10
        assert_eq!(dets[0].bbox, [40, 25, 20, 10]);
        assert_eq!(dets[1].class_id, 0);
        // x = 240 * 0.5 = 120, y = 90 * 0.5 = 45, w = min(10, 160 - 120) = 10, h = 10
        assert_eq!(dets[1].bbox, [120, 45, 10, 10]);
    }

    #[test]
    fn clips_to_the_image_and_breaks_ties_by_anchor_order() {
        let lb = Letterbox { width: 320, height: 320, x_pad: 0, y_pad: 0 };
        let rows = vec![
            ([310.0, 5.0, 40.0, 40.0], vec![0.5]), // x = 290, y = -15 -> 0; w = min(40, 30) = 30
            ([10.0, 300.0, 10.0, 10.0], vec![0.7]),
            ([10.0, 300.0, 10.0, 10.0], vec![0.7]), // exact duplicate of row 1: suppressed
        ];
        let out = output(&rows, 1);
        let dets = decode_yolov8(&out, [1, 5, 3], &[lb], &DecodeParams::default()).unwrap();
        assert_eq!(dets.len(), 2);
        assert_eq!(dets[0].bbox, [5, 295, 10, 10]);
        assert_eq!(dets[1].bbox, [290, 0, 30, 40]);
    }

    #[test]
    fn batches_are_independent_and_shapes_are_checked() {
        let lb = Letterbox { width: 320, height: 320, x_pad: 0, y_pad: 0 };
        let one = output(&[([100.0, 100.0, 50.0, 50.0], vec![0.9])], 1);
        let mut two = one.clone();
        two.extend_from_slice(&one);
        let dets = decode_yolov8(&two, [2, 5, 1], &[lb, lb], &DecodeParams::default()).unwrap();
        assert_eq!(dets.iter().map(|d| d.image).collect::<Vec<_>>(), vec![0, 1]);
        assert!(decode_yolov8(&two, [2, 5, 1], &[lb], &DecodeParams::default()).is_err());
        assert!(decode_yolov8(&two, [2, 4, 1], &[lb, lb], &DecodeParams::default()).is_err());
    }
}
