use faer::{Mat, Par};
use std::time::Instant;
fn main() {
    let d = 2048;
    let n = 3048;
    let mut s: u64 = 1;
    let mut rnd = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5 };
    let x = Mat::<f64>::from_fn(n, d, |_, _| rnd());
    let s1 = x.transpose() * &x;
    let y = Mat::<f64>::from_fn(n, d, |_, _| rnd());
    let s2 = y.transpose() * &y;
    let par = Par::Seq;
    let t = Instant::now();
    let (tr, _) = _native::frechet::trace_sqrt_product(s1.as_ref(), s2.as_ref(), par).unwrap();
    println!("total {:?} {tr}", t.elapsed());
    let t = Instant::now();
    let l = s1.llt(faer::Side::Lower).unwrap();
    println!("llt {:?}", t.elapsed());
    let t = Instant::now();
    let c = l.L().transpose() * &s2 * l.L();
    println!("full products {:?}", t.elapsed());
    let t = Instant::now();
    let e = _native::frechet::symmetric_eigenvalues(c.as_ref(), par).unwrap();
    println!("eigvals {:?} {}", t.elapsed(), e[0]);
}
