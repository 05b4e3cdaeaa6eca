//! Eigenvalues of a dense real symmetric matrix by two-stage tridiagonal reduction, the
//! eigenvalues-only route of LAPACK's `dsyevd_2stage`.
//!
//! A one-stage Householder tridiagonalization (LAPACK `dsytrd`, faer's `tridiag_in_place`) spends
//! half of its 4n³/3 flops in symmetric matrix–vector products, which stream the whole trailing
//! matrix from memory once per column. The two-stage route moves all O(n³) work into
//! matrix–matrix products and leaves only O(n² b) work outside them:
//!
//! 1. **Full → band** ([`reduce_to_band`], LAPACK `dsytrd_sy2sb`). For each panel of `b` columns,
//!    the part below the band is QR-factored with Householder reflectors, P = Q R with
//!    Q = I − V S Vᵀ (compact WY form: V unit lower trapezoidal, S upper triangular), and the
//!    trailing symmetric block is updated two-sidedly with matrix–matrix products only:
//!    X = A V S, M = Sᵀ Vᵀ X, W = X − ½ V M, then A ← Qᵀ A Q = A − V Wᵀ − W Vᵀ (a symmetric
//!    rank-2b update of the lower triangle). The result is symmetric with bandwidth `b`.
//! 2. **Band → tridiagonal** ([`band_to_tridiagonal`], LAPACK `dsytrd_sb2st`, the bulge-chasing
//!    algorithm of Haidar, Ltaief and Dongarra). Sweep `i` annihilates column `i` below the
//!    subdiagonal with one reflector of length ≤ b, applied two-sidedly to the next diagonal
//!    block; the bulge this creates in the block below is removed column by column (only its
//!    first column per sweep, the rest by the following sweeps), chasing it down the band.
//!    The sweeps work on compact column-major band storage of 2b rows, O(n² b) flops in total.
//! 3. **Tridiagonal → eigenvalues** ([`tridiagonal_eigenvalues`]): the root-free implicit QL/QR
//!    iteration of Pal, Walker and Kahan (LAPACK `dsterf`), O(n²).
//!
//! Every step is an orthogonal similarity, so the eigenvalues are those of the input to
//! working precision (backward stable, error of order ε‖A‖).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::linalg::qr::no_pivoting::factor::{qr_in_place, qr_in_place_scratch};
use faer::linalg::triangular_inverse::invert_upper_triangular;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::error::{numerical, Result};

/// Bandwidth b of the intermediate band matrix. A wider band makes stage 1 more efficient and
/// stage 2 (O(n² b)) dearer; at n = 2048 on one core, b = 24 … 64 gave totals within 5 % of each
/// other, and 32 keeps stage 2 under a sixth of the total.
pub const DEFAULT_BANDWIDTH: usize = 32;

/// Smallest dimension for which [`crate::frechet::symmetric_eigenvalues`] takes the two-stage
/// route rather than faer's one-stage solver (on one core: about equal below 512, faster from
/// there on, 1.4× at 2048).
pub const TWO_STAGE_MIN_DIM: usize = 512;

/// Eigenvalues (ascending) of the symmetric matrix `a`, of which only the lower triangle is
/// read, by the two-stage reduction with band `bandwidth` (≥ 1).
pub fn eigenvalues(a: MatRef<'_, f64>, bandwidth: usize, par: Par) -> Result<Vec<f64>> {
    let mut work = Mat::<f64>::zeros(a.nrows(), a.ncols());
    work.copy_from_triangular_lower(a);
    eigenvalues_in_place(work.as_mut(), bandwidth, par)
}

/// [`eigenvalues`], using the lower triangle of `a` as workspace (it is overwritten).
pub fn eigenvalues_in_place(
    mut a: MatMut<'_, f64>,
    bandwidth: usize,
    par: Par,
) -> Result<Vec<f64>> {
    let n = a.nrows();
    assert_eq!(n, a.ncols(), "eigenvalues: the matrix must be square");
    if (0..n).any(|j| a.rb().col(j).iter().skip(j).any(|x| !x.is_finite())) {
        return numerical("symmetric eigenvalue solver: the matrix contains NaN or inf");
    }
    let kd = bandwidth.max(1);
    reduce_to_band(a.rb_mut(), kd, par);
    let mut band = SymBand::from_lower(a.rb(), kd);
    let (mut d, mut e) = band_to_tridiagonal(&mut band);
    tridiagonal_eigenvalues(&mut d, &mut e)?;
    Ok(d)
}

// ------------------------------------------------------------------------ stage 1: full → band

/// Reduce the symmetric matrix `a` (lower triangle referenced and overwritten, as in LAPACK
/// `dsytrd_sy2sb` with `UPLO = 'L'`) to a symmetric band matrix of bandwidth `kd` by an orthogonal
/// similarity. On return the lower triangle of `a` holds the band in rows `j..=j + kd` of each
/// column `j` and zeros below; the reflectors are not kept.
///
/// Panel by panel (columns j..j + kd, rows j + kd..n below the band, m of them):
/// 1. P = Q R with Q = I − V S Vᵀ ([`panel_qr`]); the panel becomes R;
/// 2. Y = A₂₂ V, with A₂₂ the trailing m × m block (lower triangle stored, so
///    Y = tril(A₂₂) V + stril(A₂₂)ᵀ V: two triangular matrix products);
/// 3. X = Y S, M = Sᵀ (Vᵀ X) and W = X − ½ V M (k × k and m × k products);
/// 4. A₂₂ ← Qᵀ A₂₂ Q = A₂₂ − [V W] [W V]ᵀ, one rank-2k product into the lower triangle.
pub fn reduce_to_band(mut a: MatMut<'_, f64>, kd: usize, par: Par) {
    let n = a.nrows();
    assert!(kd >= 1 && a.ncols() == n);
    if n <= kd + 1 {
        return;
    }
    // Workspace, sized for the first (largest) panel and used through sub-views.
    let mut vw_buf = Mat::<f64>::zeros(n, 2 * kd); // [V W]
    let mut wv_buf = Mat::<f64>::zeros(n, 2 * kd); // [W V]
    let mut y_buf = Mat::<f64>::zeros(n, kd);
    let mut backup_buf = Mat::<f64>::zeros(n, kd);
    let mut t_buf = Mat::<f64>::zeros(kd, kd);
    let mut s_buf = Mat::<f64>::zeros(kd, kd);
    let mut p_buf = Mat::<f64>::zeros(kd, kd);
    let mut m_buf = Mat::<f64>::zeros(kd, kd);
    let mut mem = MemBuffer::new(qr_in_place_scratch::<f64>(
        n,
        kd,
        kd,
        par,
        Default::default(),
    ));

    let mut j = 0;
    while j + kd + 1 < n {
        let m = n - j - kd; // ≥ 2 rows below the band
        let k = m.min(kd); // reflectors
        let (left, right) = a.rb_mut().split_at_col_mut(j + kd);
        let mut panel = left.submatrix_mut(j + kd, j, m, kd);
        let mut a22 = right.submatrix_mut(j + kd, 0, m, m);

        // 1. P = Q R, Q = I − V S Vᵀ; V made explicit (unit lower trapezoidal) and the
        //    panel left holding R, zeros below it.
        let mut s = s_buf.as_mut().submatrix_mut(0, 0, k, k);
        panel_qr(
            panel.rb_mut(),
            backup_buf.as_mut().submatrix_mut(0, 0, m, kd),
            t_buf.as_mut().submatrix_mut(0, 0, k, k),
            s.rb_mut(),
            par,
            MemStack::new(&mut mem),
        );
        let (mut v, mut w) = vw_buf
            .as_mut()
            .submatrix_mut(0, 0, m, 2 * k)
            .split_at_col_mut(k);
        for c in 0..k {
            for r in 0..m {
                v[(r, c)] = match r.cmp(&c) {
                    core::cmp::Ordering::Greater => core::mem::replace(&mut panel[(r, c)], 0.0),
                    core::cmp::Ordering::Equal => 1.0,
                    core::cmp::Ordering::Less => 0.0,
                };
            }
        }
        let v = v.rb();

        // 2. Y = A₂₂ V = tril(A₂₂) V + stril(A₂₂)ᵀ V.
        let mut y = y_buf.as_mut().submatrix_mut(0, 0, m, k);
        tri_matmul(
            y.rb_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            a22.rb(),
            BlockStructure::TriangularLower,
            v,
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        tri_matmul(
            y.rb_mut(),
            BlockStructure::Rectangular,
            Accum::Add,
            a22.rb().transpose(),
            BlockStructure::StrictTriangularUpper,
            v,
            BlockStructure::Rectangular,
            1.0,
            par,
        );

        // 3. X = Y S (in W's place), M = Sᵀ (Vᵀ X), W = X − ½ V M.
        tri_matmul(
            w.rb_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            y.rb(),
            BlockStructure::Rectangular,
            s.rb(),
            BlockStructure::TriangularUpper,
            1.0,
            par,
        );
        let mut vtx = p_buf.as_mut().submatrix_mut(0, 0, k, k);
        matmul(
            vtx.rb_mut(),
            Accum::Replace,
            v.transpose(),
            w.rb(),
            1.0,
            par,
        );
        let mut msym = m_buf.as_mut().submatrix_mut(0, 0, k, k);
        tri_matmul(
            msym.rb_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            s.rb().transpose(),
            BlockStructure::TriangularLower,
            vtx.rb(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        matmul(w.rb_mut(), Accum::Add, v, msym.rb(), -0.5, par);

        // 4. A₂₂ ← A₂₂ − V Wᵀ − W Vᵀ = A₂₂ − [V W] [W V]ᵀ, lower triangle only.
        let mut wv = wv_buf.as_mut().submatrix_mut(0, 0, m, 2 * k);
        wv.rb_mut().submatrix_mut(0, 0, m, k).copy_from(w.rb());
        wv.rb_mut().submatrix_mut(0, k, m, k).copy_from(v);
        tri_matmul(
            a22.rb_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            vw_buf.as_ref().submatrix(0, 0, m, 2 * k),
            BlockStructure::Rectangular,
            wv.rb().transpose(),
            BlockStructure::Rectangular,
            -1.0,
            par,
        );
        j += kd;
    }
}

/// Householder QR of the m × kd panel, P = Q R with Q = H₀ ⋯ H_{k−1} = I − V S Vᵀ, k = min(m, kd).
///
/// On return `panel` holds R on and above its diagonal and the essential parts of the
/// reflectors (V without its unit diagonal) below, and `s` holds the upper-triangular S.
/// faer's blocked QR (`qr::no_pivoting::factor::qr_in_place`) stores the factor T of
/// Q = I − V T⁻¹ Vᵀ, so S = T⁻¹. Where faer leaves a reflector out or marks it as the identity
/// (T = ∞ on the diagonal) — a panel of deficient numerical rank, a column already zero below
/// its diagonal, the length-1 last reflector of a panel with m ≤ kd rows — the panel is
/// factored again by [`panel_qr_unblocked`], which gives such a reflector τ = 0.
fn panel_qr(
    mut panel: MatMut<'_, f64>,
    mut backup: MatMut<'_, f64>,
    mut t: MatMut<'_, f64>,
    mut s: MatMut<'_, f64>,
    par: Par,
    stack: &mut MemStack,
) {
    let k = s.nrows();
    backup.copy_from(panel.rb());
    let info = qr_in_place(panel.rb_mut(), t.rb_mut(), par, stack, Default::default());
    if info.rank == k && t.rb().is_all_finite() {
        invert_upper_triangular(s.rb_mut(), t.rb(), par);
        if s.rb().is_all_finite() {
            for c in 0..k {
                for r in c + 1..k {
                    s[(r, c)] = 0.0;
                }
            }
            return;
        }
    }
    panel.copy_from(backup.rb());
    panel_qr_unblocked(panel, s);
}

/// Unblocked Householder QR (LAPACK `dgeqr2`) and the triangular factor of its compact WY
/// form (LAPACK `dlarft`, forward, columnwise): Q = H₀ ⋯ H_{k−1} = I − V S Vᵀ with
/// Hᵢ = I − τᵢ vᵢ vᵢᵀ. A column that is already zero below its diagonal gets τ = 0 (Hᵢ = I).
fn panel_qr_unblocked(mut panel: MatMut<'_, f64>, mut s: MatMut<'_, f64>) {
    let (m, ncols) = panel.shape();
    let k = s.nrows();
    let mut tau = vec![0.0; k];
    for c in 0..k {
        let mut col = panel.rb_mut().col_mut(c);
        let mut x: Vec<f64> = (c..m).map(|r| col[r]).collect();
        let (beta, tc) = make_reflector(&mut x);
        col[c] = beta;
        for (r, xv) in (c + 1..m).zip(&x[1..]) {
            col[r] = *xv;
        }
        tau[c] = tc;
        if tc == 0.0 {
            continue;
        }
        // Apply Hc = I − τ v vᵀ (v = [1, x[1..]]) to the columns to the right.
        for q in c + 1..ncols {
            let mut dotv = panel[(c, q)];
            for (r, xv) in (c + 1..m).zip(&x[1..]) {
                dotv += xv * panel[(r, q)];
            }
            let f = tc * dotv;
            panel[(c, q)] -= f;
            for (r, xv) in (c + 1..m).zip(&x[1..]) {
                panel[(r, q)] -= f * xv;
            }
        }
    }
    // S: S[c, c] = τ_c, S[0..c, c] = −τ_c S[0..c, 0..c] (V[:, 0..c]ᵀ v_c).
    s.fill(0.0);
    let mut z = vec![0.0; k];
    for c in 0..k {
        s[(c, c)] = tau[c];
        if tau[c] == 0.0 {
            continue;
        }
        for (i, zi) in z.iter_mut().enumerate().take(c) {
            // v_i[r] = panel[r, i] for r > i, 1 at r = i; v_c is zero above row c, 1 at c.
            let mut acc = panel[(c, i)];
            for r in c + 1..m {
                acc += panel[(r, i)] * panel[(r, c)];
            }
            *zi = acc;
        }
        for i in 0..c {
            let mut acc = 0.0;
            for l in i..c {
                acc += s[(i, l)] * z[l];
            }
            s[(i, c)] = -tau[c] * acc;
        }
    }
}

/// Householder reflector H = I − τ v vᵀ (v₀ = 1) with H x = β e₀ (LAPACK `dlarfg`).
/// On return `x[1..]` holds v's essential part; returns (β, τ). τ = 0 when x[1..] = 0.
/// The norm is computed on x scaled by its largest entry, and v by division, so neither
/// overflows nor underflows.
#[inline(always)]
fn make_reflector(x: &mut [f64]) -> (f64, f64) {
    let alpha = x[0];
    let tail_max = x[1..].iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if tail_max == 0.0 {
        return (alpha, 0.0);
    }
    let scale = tail_max.max(alpha.abs());
    let inv = 1.0 / scale;
    let ssq: f64 = x.iter().map(|v| (v * inv) * (v * inv)).sum();
    let norm = scale * ssq.sqrt();
    let beta = if alpha >= 0.0 { -norm } else { norm };
    let tau = (beta - alpha) / beta;
    let denom = alpha - beta;
    for v in x[1..].iter_mut() {
        *v /= denom;
    }
    (beta, tau)
}

// ------------------------------------------------------------------ stage 2: band → tridiagonal

/// Symmetric band matrix in compact column-major lower storage, with room for the bulge of the
/// chase: element (i, j), j ≤ i < j + `ld`, is at `data[j * ld + (i − j)]`, `ld` = min(2 kd, n).
/// Every kernel of the chase works on whole or partial columns, which are contiguous here.
pub struct SymBand {
    n: usize,
    kd: usize,
    ld: usize,
    data: Vec<f64>,
}

impl SymBand {
    /// The band of bandwidth `kd` of the lower triangle of `a` (entries below it are ignored).
    pub fn from_lower(a: MatRef<'_, f64>, kd: usize) -> Self {
        let n = a.nrows();
        let kd = kd.max(1);
        let ld = (2 * kd).min(n).max(1);
        let mut data = vec![0.0; ld * n];
        for j in 0..n {
            let col = a.col(j);
            for off in 0..=kd.min(n - 1 - j) {
                data[j * ld + off] = col[j + off];
            }
        }
        SymBand { n, kd, ld, data }
    }

    /// Diagonal and subdiagonal.
    fn tridiagonal(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.n;
        let d = (0..n).map(|j| self.data[j * self.ld]).collect();
        let e = (0..n.saturating_sub(1))
            .map(|j| self.data[j * self.ld + 1])
            .collect();
        (d, e)
    }
}

/// Reduce the band matrix to symmetric tridiagonal form by orthogonal similarity (bulge chasing,
/// LAPACK `dsytrd_sb2st` with the kernels of `dsb2st_kernels`, lower storage, sweeps run one
/// after the other). Returns the diagonal (n) and subdiagonal (n − 1); `band` is overwritten.
pub fn band_to_tridiagonal(band: &mut SymBand) -> (Vec<f64>, Vec<f64>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the feature the function is compiled for.
            unsafe { chase_avx2(band) };
            return band.tridiagonal();
        }
    }
    chase(band);
    band.tridiagonal()
}

/// [`chase`] compiled for AVX2 (4-wide vectors in its column kernels), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chase_avx2(band: &mut SymBand) {
    chase(band)
}

/// The bulge-chasing sweeps, i = 0 … n − 3. Sweep i:
/// 1. a reflector H annihilates column i below the subdiagonal (rows i + 2 ..= i + kd) and is
///    applied from both sides to the diagonal block D = A[i+1..=i+kd, i+1..=i+kd];
/// 2. then, down the band, block after block: H is applied from the right to the block C below
///    D (rows ed + 1 ..= ed + kd), which fills C; a new reflector annihilates C's first column
///    and is applied from the left to C's other columns and from both sides to the next
///    diagonal block, and becomes H.
///
/// The rest of each bulge lies in the columns that the following sweeps annihilate.
#[inline(always)]
fn chase(band: &mut SymBand) {
    let n = band.n;
    let kd = band.kd;
    let ld = band.ld;
    if n < 3 || kd < 2 {
        return;
    }
    let a = &mut band.data[..];
    let mut v = vec![0.0; kd];
    let mut u = vec![0.0; kd];
    let mut work = vec![0.0; kd];
    for i in 0..n - 2 {
        // Column i, rows st..=ed, and the diagonal block D = A[st..=ed, st..=ed].
        let mut st = i + 1;
        let mut ed = (i + kd).min(n - 1);
        let mut ln = ed - st + 1;
        let mut tau = reflector_from_column(a, ld, i, st - i, ln, &mut v[..ln]);
        if tau != 0.0 {
            two_sided(a, ld, st, &v[..ln], tau, &mut work[..ln]);
        }
        loop {
            let j1 = ed + 1;
            if j1 >= n {
                break;
            }
            let j2 = (ed + kd).min(n - 1);
            let lm = j2 - j1 + 1;
            // C = A[j1..=j2, st..=ed] ← C H, then annihilate C's first column.
            if tau != 0.0 {
                right_apply(a, ld, j1, lm, st, &v[..ln], tau, &mut work[..lm]);
            }
            let tau2 = reflector_from_column(a, ld, st, j1 - st, lm, &mut u[..lm]);
            if tau2 != 0.0 {
                left_apply(a, ld, j1, st + 1, ln - 1, &u[..lm], tau2);
                two_sided(a, ld, j1, &u[..lm], tau2, &mut work[..lm]);
            }
            core::mem::swap(&mut u, &mut v);
            tau = tau2;
            st = j1;
            ed = j2;
            ln = lm;
        }
    }
}

/// Reflector annihilating A[j + off + 1 .. j + off + len, j] (column `j`, the `len` entries from
/// offset `off` in the band), with β written at offset `off` and zeros below; `v` receives the
/// full reflector vector (v₀ = 1). Returns τ.
#[inline(always)]
fn reflector_from_column(
    a: &mut [f64],
    ld: usize,
    j: usize,
    off: usize,
    len: usize,
    v: &mut [f64],
) -> f64 {
    let seg = &mut a[j * ld + off..j * ld + off + len];
    v.copy_from_slice(seg);
    let (beta, tau) = make_reflector(v);
    seg[0] = beta;
    seg[1..].fill(0.0);
    v[0] = 1.0;
    tau
}

/// D ← H D H for the symmetric diagonal block D = A[st..st+l, st..st+l] (lower band storage),
/// H = I − τ v vᵀ (LAPACK `dlarfy`): w = τ D v, w ← w − ½ τ (wᵀv) v, D ← D − v wᵀ − w vᵀ.
#[inline(always)]
fn two_sided(a: &mut [f64], ld: usize, st: usize, v: &[f64], tau: f64, w: &mut [f64]) {
    let l = v.len();
    w.fill(0.0);
    for q in 0..l {
        let col = &a[(st + q) * ld..(st + q) * ld + (l - q)];
        let vq = v[q];
        let (w_head, w_tail) = w[q..].split_at_mut(1);
        w_head[0] += dot(col, &v[q..]);
        axpy(vq, &col[1..], w_tail);
    }
    for x in w.iter_mut() {
        *x *= tau;
    }
    let alpha = -0.5 * tau * dot(w, v);
    axpy(alpha, v, w);
    for q in 0..l {
        let col = &mut a[(st + q) * ld..(st + q) * ld + (l - q)];
        let (vq, wq) = (v[q], w[q]);
        for ((c, vr), wr) in col.iter_mut().zip(&v[q..]).zip(&w[q..]) {
            *c -= vr * wq + wr * vq;
        }
    }
}

/// C ← C (I − τ v vᵀ) for C = A[r0..r0+lm, c0..c0+v.len()] (lower band storage): t = C v,
/// C ← C − τ t vᵀ.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn right_apply(
    a: &mut [f64],
    ld: usize,
    r0: usize,
    lm: usize,
    c0: usize,
    v: &[f64],
    tau: f64,
    t: &mut [f64],
) {
    t.fill(0.0);
    for (q, &vq) in v.iter().enumerate() {
        let c = c0 + q;
        let off = c * ld + (r0 - c);
        axpy(vq, &a[off..off + lm], t);
    }
    for (q, &vq) in v.iter().enumerate() {
        let c = c0 + q;
        let off = c * ld + (r0 - c);
        axpy(-tau * vq, t, &mut a[off..off + lm]);
    }
}

/// C ← (I − τ u uᵀ) C for C = A[r0..r0+u.len(), c0..c0+ncols] (lower band storage).
#[inline(always)]
fn left_apply(a: &mut [f64], ld: usize, r0: usize, c0: usize, ncols: usize, u: &[f64], tau: f64) {
    let lm = u.len();
    for c in c0..c0 + ncols {
        let off = c * ld + (r0 - c);
        let col = &mut a[off..off + lm];
        let f = -tau * dot(u, col);
        axpy(f, u, col);
    }
}

/// x · y with four partial sums (lets the compiler vectorize the reduction).
#[inline(always)]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0f64; 4];
    let xc = x.chunks_exact(4);
    let yc = y.chunks_exact(4);
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..4 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for (a, b) in xr.iter().zip(yr) {
        s += a * b;
    }
    s
}

/// y ← y + α x.
#[inline(always)]
fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

// -------------------------------------------------------- stage 3: tridiagonal → eigenvalues

/// Eigenvalues of the symmetric tridiagonal matrix with diagonal `d` and subdiagonal `e`, by the
/// root-free implicit QL/QR iteration of Pal, Walker and Kahan (LAPACK `dsterf`): the sweep
/// direction follows the larger end of each unreduced block, and each block is scaled
/// to avoid over/underflow. On return `d` holds the eigenvalues in ascending order and `e` is
/// destroyed.
///
/// faer's tridiagonal QR (`evd::tridiagonal_self_adjoint_evd`) would do, but on the n = 2048
/// tridiagonal matrix of the `timing` test it took twice as long, and differed from LAPACK's
/// bisection (`dstebz`) by 3.4e-13 · max |λ| where this iteration differs by 1.3e-14 (it gives
/// LAPACK `dsterf`'s values exactly there).
pub fn tridiagonal_eigenvalues(d: &mut [f64], e: &mut [f64]) -> Result<()> {
    let n = d.len();
    assert!(e.len() + 1 >= n);
    if n <= 1 {
        return Ok(());
    }
    let eps = f64::EPSILON / 2.0;
    let eps2 = eps * eps;
    let safmin = f64::MIN_POSITIVE;
    let safmax = 1.0 / safmin;
    let ssfmax = safmax.sqrt() / 3.0;
    let ssfmin = safmin.sqrt() / eps2;
    let max_iter = 30 * n;
    let mut jtot = 0usize;

    let mut l1 = 0usize;
    loop {
        if l1 >= n {
            break;
        }
        if l1 > 0 {
            e[l1 - 1] = 0.0;
        }
        // Find the end m of the unreduced block l1..=m (small subdiagonals set to zero).
        let mut m = l1;
        while m + 1 < n {
            let tst = e[m].abs();
            if tst == 0.0 {
                break;
            }
            if tst <= (d[m].abs().sqrt() * d[m + 1].abs().sqrt()) * eps {
                e[m] = 0.0;
                break;
            }
            m += 1;
        }
        let mut l = l1;
        let lsv = l;
        let mut lend = m;
        let lendsv = lend;
        l1 = m + 1;
        if lend == l {
            continue;
        }
        // Scale the block.
        let anorm = max_abs_tridiag(&d[l..=lend], &e[l..lend]);
        let mut iscale = 0;
        if anorm == 0.0 {
            continue;
        }
        if anorm > ssfmax {
            iscale = 1;
            scale_block(d, e, l, lend, ssfmax / anorm);
        } else if anorm < ssfmin {
            iscale = 2;
            scale_block(d, e, l, lend, ssfmin / anorm);
        }
        for x in e[l..lend].iter_mut() {
            *x *= *x;
        }
        // QL when the bottom end is larger, QR otherwise.
        if d[lend].abs() < d[l].abs() {
            lend = lsv;
            l = lendsv;
        }
        if lend >= l {
            // QL iteration: look for a small subdiagonal from the top.
            loop {
                let mut mm = l;
                while mm < lend {
                    if e[mm].abs() <= eps2 * (d[mm] * d[mm + 1]).abs() {
                        break;
                    }
                    mm += 1;
                }
                if mm < lend {
                    e[mm] = 0.0;
                }
                let p = d[l];
                if mm == l {
                    // Eigenvalue found.
                    d[l] = p;
                    l += 1;
                    if l <= lend {
                        continue;
                    }
                    break;
                }
                if mm == l + 1 {
                    // 2 × 2 block.
                    let (rt1, rt2) = eig2(d[l], e[l].sqrt(), d[l + 1]);
                    d[l] = rt1;
                    d[l + 1] = rt2;
                    e[l] = 0.0;
                    l += 2;
                    if l <= lend {
                        continue;
                    }
                    break;
                }
                if jtot == max_iter {
                    break;
                }
                jtot += 1;
                // Form the shift.
                let rte = e[l].sqrt();
                let mut sigma = (d[l + 1] - p) / (2.0 * rte);
                let r = sigma.hypot(1.0);
                sigma = p - (rte / (sigma + r.copysign(sigma)));
                let mut c = 1.0;
                let mut s = 0.0;
                let mut gamma = d[mm] - sigma;
                let mut pp = gamma * gamma;
                // Inner loop.
                for i in (l..mm).rev() {
                    let bb = e[i];
                    let r = pp + bb;
                    if i != mm - 1 {
                        e[i + 1] = s * r;
                    }
                    let oldc = c;
                    c = pp / r;
                    s = bb / r;
                    let oldgam = gamma;
                    let alpha = d[i];
                    gamma = c * (alpha - sigma) - s * oldgam;
                    d[i + 1] = oldgam + (alpha - gamma);
                    pp = if c != 0.0 {
                        (gamma * gamma) / c
                    } else {
                        oldc * bb
                    };
                }
                e[l] = s * pp;
                d[l] = sigma + gamma;
            }
        } else {
            // QR iteration: look for a small superdiagonal from the bottom.
            loop {
                let mut mm = l;
                while mm > lend {
                    if e[mm - 1].abs() <= eps2 * (d[mm] * d[mm - 1]).abs() {
                        break;
                    }
                    mm -= 1;
                }
                if mm > lend {
                    e[mm - 1] = 0.0;
                }
                let p = d[l];
                if mm == l {
                    d[l] = p;
                    if l > lend {
                        l -= 1;
                        continue;
                    }
                    break;
                }
                if mm + 1 == l {
                    let (rt1, rt2) = eig2(d[l], e[l - 1].sqrt(), d[l - 1]);
                    d[l] = rt1;
                    d[l - 1] = rt2;
                    e[l - 1] = 0.0;
                    if l >= lend + 2 {
                        l -= 2;
                        continue;
                    }
                    break;
                }
                if jtot == max_iter {
                    break;
                }
                jtot += 1;
                let rte = e[l - 1].sqrt();
                let mut sigma = (d[l - 1] - p) / (2.0 * rte);
                let r = sigma.hypot(1.0);
                sigma = p - (rte / (sigma + r.copysign(sigma)));
                let mut c = 1.0;
                let mut s = 0.0;
                let mut gamma = d[mm] - sigma;
                let mut pp = gamma * gamma;
                for i in mm..l {
                    let bb = e[i];
                    let r = pp + bb;
                    if i != mm {
                        e[i - 1] = s * r;
                    }
                    let oldc = c;
                    c = pp / r;
                    s = bb / r;
                    let oldgam = gamma;
                    let alpha = d[i + 1];
                    gamma = c * (alpha - sigma) - s * oldgam;
                    d[i] = oldgam + (alpha - gamma);
                    pp = if c != 0.0 {
                        (gamma * gamma) / c
                    } else {
                        oldc * bb
                    };
                }
                e[l - 1] = s * pp;
                d[l] = sigma + gamma;
            }
        }
        // Undo the scaling.
        if iscale == 1 {
            for x in d[lsv..=lendsv].iter_mut() {
                *x *= anorm / ssfmax;
            }
        } else if iscale == 2 {
            for x in d[lsv..=lendsv].iter_mut() {
                *x *= anorm / ssfmin;
            }
        }
        if jtot >= max_iter {
            if e[..n - 1].iter().any(|&x| x != 0.0) {
                return numerical(
                    "symmetric tridiagonal eigenvalue iteration did not converge".to_string(),
                );
            }
            break;
        }
    }
    d.sort_by(|a, b| a.total_cmp(b));
    Ok(())
}

fn max_abs_tridiag(d: &[f64], e: &[f64]) -> f64 {
    let md = d.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    e.iter().fold(md, |m, x| m.max(x.abs()))
}

fn scale_block(d: &mut [f64], e: &mut [f64], l: usize, lend: usize, f: f64) {
    for x in d[l..=lend].iter_mut() {
        *x *= f;
    }
    for x in e[l..lend].iter_mut() {
        *x *= f;
    }
}

/// Eigenvalues (rt1 larger in magnitude) of the 2 × 2 symmetric matrix [[a, b], [b, c]]
/// (LAPACK `dlae2`).
fn eig2(a: f64, b: f64, c: f64) -> (f64, f64) {
    let sm = a + c;
    let df = a - c;
    let adf = df.abs();
    let tb = b + b;
    let ab = tb.abs();
    let (acmx, acmn) = if a.abs() > c.abs() { (a, c) } else { (c, a) };
    let rt = if adf > ab {
        adf * (1.0 + (ab / adf).powi(2)).sqrt()
    } else if adf < ab {
        ab * (1.0 + (adf / ab).powi(2)).sqrt()
    } else {
        ab * std::f64::consts::SQRT_2
    };
    if sm < 0.0 {
        let rt1 = 0.5 * (sm - rt);
        (rt1, (acmx / rt1) * acmn - (b / rt1) * b)
    } else if sm > 0.0 {
        let rt1 = 0.5 * (sm + rt);
        (rt1, (acmx / rt1) * acmn - (b / rt1) * b)
    } else {
        (0.5 * rt, -0.5 * rt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Lcg;
    use faer::diag::Diag;
    use faer::linalg::evd::{self_adjoint_evd_scratch, ComputeEigenvectors};

    /// Reference: faer's one-stage symmetric eigenvalue solver (what the Fréchet kernel uses below
    /// [`TWO_STAGE_MIN_DIM`]).
    fn faer_eigenvalues(a: MatRef<'_, f64>) -> Vec<f64> {
        crate::frechet::one_stage_eigenvalues(a, Par::Seq).unwrap()
    }

    fn random_symmetric(rng: &mut Lcg, n: usize) -> Mat<f64> {
        let mut a = Mat::from_fn(n, n, |_, _| 2.0 * rng.uniform() - 1.0);
        for j in 0..n {
            for i in 0..j {
                a[(i, j)] = a[(j, i)];
            }
        }
        a
    }

    /// Q diag(λ) Qᵀ with Q orthogonal (the Q factor of a random matrix, from faer's QR).
    fn with_spectrum(rng: &mut Lcg, lambda: &[f64]) -> Mat<f64> {
        let n = lambda.len();
        let g = Mat::from_fn(n, n, |_, _| 2.0 * rng.uniform() - 1.0);
        let q = g.qr().compute_Q();
        let ql = Mat::from_fn(n, n, |i, j| q[(i, j)] * lambda[j]);
        let a = &ql * q.transpose();
        Mat::from_fn(n, n, |i, j| 0.5 * (a[(i, j)] + a[(j, i)]))
    }

    /// The dense symmetric tridiagonal matrix with diagonal `d` and off-diagonal `e`.
    fn tridiagonal_matrix(d: &[f64], e: &[f64]) -> Mat<f64> {
        let n = d.len();
        Mat::from_fn(n, n, |i, j| {
            if i == j {
                d[i]
            } else if i == j + 1 {
                e[j]
            } else if j == i + 1 {
                e[i]
            } else {
                0.0
            }
        })
    }

    fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(f64::MIN_POSITIVE, |m, x| m.max(x.abs()));
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / scale
    }

    fn check(a: &Mat<f64>, kd: usize, tol: f64, what: &str) {
        let want = faer_eigenvalues(a.as_ref());
        let pars: &[Par] = if a.nrows() >= 100 {
            &[Par::Seq, Par::rayon(2)]
        } else {
            &[Par::Seq]
        };
        for &par in pars {
            let got = eigenvalues(a.as_ref(), kd, par).unwrap();
            let err = max_rel_err(&got, &want);
            assert!(
                err <= tol,
                "{what}, n={}, kd={kd}: relative error {err:.3e}",
                a.nrows()
            );
        }
    }

    /// n = 1, 2, n < b, n = b ± 1, n not a multiple of b, several panels; b = 1 (stage 1 alone
    /// gives the tridiagonal matrix) up to b > n (stage 2 alone).
    #[test]
    fn matches_faer_on_random_symmetric_matrices() {
        let mut rng = Lcg::new(1);
        for n in [1, 2, 3, 5, 17, 31, 32, 33, 70] {
            let a = random_symmetric(&mut rng, n);
            for kd in [1, 2, 3, 8, 32] {
                check(&a, kd, 1e-12, "random");
            }
        }
        let a = random_symmetric(&mut rng, 141);
        for kd in [16, DEFAULT_BANDWIDTH] {
            check(&a, kd, 1e-12, "random");
        }
    }

    #[test]
    fn repeated_and_clustered_eigenvalues() {
        let mut rng = Lcg::new(3);
        let n = 100;
        // Three eigenvalues of multiplicity 35, 20 and 25, and a cluster of 20 within 2e-9.
        let lambda: Vec<f64> = (0..n)
            .map(|i| match i {
                0..=34 => 1.0,
                35..=54 => 2.5,
                55..=79 => 1e-3,
                _ => 4.0 + 1e-10 * (i as f64),
            })
            .collect();
        let a = with_spectrum(&mut rng, &lambda);
        for kd in [4, 32] {
            check(&a, kd, 1e-12, "clustered");
        }
        let mut want = lambda.clone();
        want.sort_by(f64::total_cmp);
        let got = eigenvalues(a.as_ref(), 32, Par::Seq).unwrap();
        assert!(max_rel_err(&got, &want) < 1e-12);
    }

    #[test]
    fn indefinite_and_graded_spectra() {
        let mut rng = Lcg::new(4);
        let n = 80;
        let indefinite: Vec<f64> = (0..n).map(|i| (i as f64) - 40.5).collect();
        let a = with_spectrum(&mut rng, &indefinite);
        for kd in [5, 32] {
            check(&a, kd, 1e-12, "indefinite");
        }
        let graded: Vec<f64> = (0..n).map(|i| 10f64.powf(-(i as f64) / 10.0)).collect();
        let a = with_spectrum(&mut rng, &graded);
        check(&a, 32, 1e-12, "graded");
    }

    /// Panels with zero or dependent columns: diagonal, zero, low-rank and block-diagonal
    /// matrices (faer's QR reports a deficient rank there and the unblocked QR takes over).
    #[test]
    fn rank_deficient_panels() {
        let mut rng = Lcg::new(5);
        let n = 100;
        let diag = Mat::from_fn(n, n, |i, j| if i == j { (i as f64) - 30.0 } else { 0.0 });
        check(&diag, 16, 1e-12, "diagonal");
        check(&Mat::<f64>::zeros(n, n), 16, 0.0, "zero");
        let x = Mat::from_fn(n, 3, |_, _| rng.uniform() - 0.5);
        let low_rank = &x * x.transpose();
        check(&low_rank, 16, 1e-12, "rank 3");
        let b = random_symmetric(&mut rng, 40);
        let block = Mat::from_fn(n, n, |i, j| {
            if i < 40 && j < 40 {
                b[(i, j)]
            } else if i == j {
                1.0
            } else {
                0.0
            }
        });
        check(&block, 16, 1e-12, "block diagonal");
        let mut arrow = Mat::<f64>::identity(n, n);
        for i in 1..n {
            arrow[(i, 0)] = 1.0 / (i as f64);
            arrow[(0, i)] = 1.0 / (i as f64);
        }
        check(&arrow, 8, 1e-12, "arrowhead");
    }

    #[test]
    fn rejects_non_finite_input() {
        let mut a = Mat::<f64>::identity(600, 600);
        a[(400, 3)] = f64::NAN;
        let err = eigenvalues(a.as_ref(), DEFAULT_BANDWIDTH, Par::Seq).unwrap_err();
        assert!(matches!(err, crate::error::Error::Numerical(ref m) if m.contains("NaN")));
    }

    /// The unblocked panel QR gives an orthogonal Q = I − V S Vᵀ with Qᵀ P = R.
    #[test]
    fn unblocked_panel_qr_is_a_qr() {
        let mut rng = Lcg::new(6);
        for (m, nc) in [(20, 6), (6, 6), (4, 6), (30, 1)] {
            let mut p = Mat::from_fn(m, nc, |_, _| rng.uniform() - 0.5);
            if nc > 2 {
                for r in 0..m {
                    p[(r, 2)] = 0.0; // a zero column
                }
            }
            let k = m.min(nc);
            let mut f = p.clone();
            let mut s = Mat::<f64>::zeros(k, k);
            panel_qr_unblocked(f.as_mut(), s.as_mut());
            let v = Mat::from_fn(m, k, |r, c| {
                if r > c {
                    f[(r, c)]
                } else if r == c {
                    1.0
                } else {
                    0.0
                }
            });
            let r = Mat::from_fn(m, nc, |i, j| if i <= j { f[(i, j)] } else { 0.0 });
            let q = Mat::<f64>::identity(m, m) - &v * &s * v.transpose();
            let qtq = q.transpose() * &q - Mat::<f64>::identity(m, m);
            let resid = &q * &r - &p;
            assert!(qtq.norm_max() < 1e-14, "orthogonality {}", qtq.norm_max());
            assert!(resid.norm_max() < 1e-14, "residual {}", resid.norm_max());
        }
    }

    /// Stage 1 leaves a band matrix with the input's eigenvalues.
    #[test]
    fn reduce_to_band_leaves_a_band() {
        let mut rng = Lcg::new(7);
        let (n, kd) = (90, 7);
        let a = random_symmetric(&mut rng, n);
        let mut w = a.clone();
        reduce_to_band(w.as_mut(), kd, Par::Seq);
        for j in 0..n {
            for i in j + kd + 1..n {
                assert_eq!(w[(i, j)], 0.0, "({i}, {j}) outside the band");
            }
        }
        let full = Mat::from_fn(n, n, |i, j| if i >= j { w[(i, j)] } else { w[(j, i)] });
        assert!(
            max_rel_err(
                &faer_eigenvalues(full.as_ref()),
                &faer_eigenvalues(a.as_ref())
            ) < 1e-12
        );
    }

    #[test]
    fn tridiagonal_solver_matches_faer() {
        let mut rng = Lcg::new(8);
        for n in [1usize, 2, 3, 10, 120] {
            let mut d: Vec<f64> = (0..n).map(|_| rng.uniform() - 0.5).collect();
            let mut e: Vec<f64> = (0..n.saturating_sub(1))
                .map(|_| rng.uniform() - 0.5)
                .collect();
            if n > 5 {
                e[3] = 0.0; // a split
                e[4] = 1e-300;
            }
            let want = faer_eigenvalues(tridiagonal_matrix(&d, &e).as_ref());
            tridiagonal_eigenvalues(&mut d, &mut e).unwrap();
            assert!(max_rel_err(&d, &want) < 1e-13, "n={n}");
        }
        // Entries near the overflow and underflow thresholds are scaled.
        for scale in [1e300, 1e-300] {
            let mut d = vec![2.0 * scale, 1.0 * scale, 3.0 * scale];
            let mut e = vec![0.5 * scale, 0.25 * scale];
            let want: Vec<f64> =
                faer_eigenvalues(tridiagonal_matrix(&[2.0, 1.0, 3.0], &[0.5, 0.25]).as_ref())
                    .iter()
                    .map(|x| x * scale)
                    .collect();
            tridiagonal_eigenvalues(&mut d, &mut e).unwrap();
            assert!(max_rel_err(&d, &want) < 1e-14, "scale {scale:e}");
        }
    }

    /// Seconds this thread has been on a CPU (from /proc/thread-self/schedstat): unlike wall
    /// time, not inflated by other processes taking the core.
    pub(super) fn cpu_seconds() -> f64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<f64>().ok())
            })
            .map(|ns| ns * 1e-9)
            .unwrap_or(0.0)
    }

    /// Timing of the stages at n = 2048 against faer's one-stage solver (not a correctness test):
    /// `cargo test --release -p rust_metrics symeig::tests::timing -- --ignored --nocapture`
    /// (SYMEIG_N, SYMEIG_KD=16,32,…, SYMEIG_REPS; on-CPU seconds, best of the repetitions).
    #[test]
    #[ignore]
    fn timing() {
        let env = |k: &str| std::env::var(k).ok();
        let n: usize = env("SYMEIG_N").and_then(|s| s.parse().ok()).unwrap_or(2048);
        let reps: usize = env("SYMEIG_REPS").and_then(|s| s.parse().ok()).unwrap_or(3);
        let kds: Vec<usize> = env("SYMEIG_KD")
            .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or(vec![16, 24, 32, 48, 64]);
        let par = Par::Seq;
        let mut rng = Lcg::new(9);
        let x = Mat::from_fn(n, n, |_, _| rng.uniform() - 0.5);
        let a = &x * x.transpose();
        let want = faer_eigenvalues(a.as_ref());
        if env("SYMEIG_SKIP_FAER").is_none() {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t0 = cpu_seconds();
                std::hint::black_box(faer_eigenvalues(a.as_ref()));
                best = best.min(cpu_seconds() - t0);
            }
            println!("n={n}: faer one-stage {best:.3} s");
        }
        for kd in kds {
            let mut best = [f64::INFINITY; 4];
            let mut err = 0.0;
            for _ in 0..reps {
                let mut w = Mat::<f64>::zeros(n, n);
                w.copy_from_triangular_lower(a.as_ref());
                let t0 = cpu_seconds();
                reduce_to_band(w.as_mut(), kd, par);
                let t1 = cpu_seconds();
                let mut band = SymBand::from_lower(w.as_ref(), kd);
                let (mut d, mut e) = band_to_tridiagonal(&mut band);
                let t2 = cpu_seconds();
                tridiagonal_eigenvalues(&mut d, &mut e).unwrap();
                let t3 = cpu_seconds();
                for (b, t) in best.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t3 - t0]) {
                    *b = b.min(t);
                }
                err = max_rel_err(&d, &want);
            }
            println!(
                "n={n} kd={kd:3}: band {:.3} s, chase {:.3} s, tridiagonal {:.3} s, total {:.3} s, \
                 difference from faer {err:.1e}",
                best[0], best[1], best[2], best[3]
            );
        }
    }
    /// Stage 3 against faer's public tridiagonal QR (`tridiagonal_self_adjoint_evd`) on the
    /// tridiagonal matrix of the `timing` matrix: on-CPU seconds and their difference.
    #[test]
    #[ignore]
    fn tridiagonal_timing() {
        use faer::diag::DiagRef;
        use faer::linalg::evd::tridiagonal_self_adjoint_evd;
        let n = 2048;
        let mut rng = Lcg::new(9);
        let x = Mat::from_fn(n, n, |_, _| rng.uniform() - 0.5);
        let mut w = &x * x.transpose();
        reduce_to_band(w.as_mut(), DEFAULT_BANDWIDTH, Par::Seq);
        let (d0, e0) = band_to_tridiagonal(&mut SymBand::from_lower(w.as_ref(), DEFAULT_BANDWIDTH));
        let mut e1 = e0.clone();
        e1.push(0.0);
        for _ in 0..3 {
            let (mut d, mut e) = (d0.clone(), e0.clone());
            let t0 = cpu_seconds();
            tridiagonal_eigenvalues(&mut d, &mut e).unwrap();
            let t1 = cpu_seconds();
            let mut s = Diag::<f64>::zeros(n);
            let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
                n,
                ComputeEigenvectors::No,
                Par::Seq,
                Default::default(),
            ));
            tridiagonal_self_adjoint_evd(
                DiagRef::from_slice(&d0),
                DiagRef::from_slice(&e1),
                s.as_mut(),
                None,
                Par::Seq,
                MemStack::new(&mut mem),
                Default::default(),
            )
            .unwrap();
            let t2 = cpu_seconds();
            let f: Vec<f64> = s.column_vector().iter().copied().collect();
            println!(
                "root-free QL/QR {:.4} s, faer tridiagonal QR {:.4} s, difference {:.1e}",
                t1 - t0,
                t2 - t1,
                max_rel_err(&d, &f)
            );
        }
    }
}
