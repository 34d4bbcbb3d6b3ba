//! Platform-independent elementary functions built only from IEEE-754 `+ - * /`, and a 64-bit
//! integer hash, so generated phantoms and augmentation parameters are bit-identical on every
//! machine (the standard library's `exp`/`ln`/`sin` call the platform's libm, whose last bits
//! may differ).

use std::f64::consts::{FRAC_PI_2, LN_2, PI};

/// High part of ln 2 (trailing mantissa bits zero, so `k * LN2_HI` is exact).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// Low part of ln 2 (`ln 2 - LN2_HI`).
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `e^x`, accurate to a few ulp; saturates to 0 below -700 and to +inf above 700.
pub(crate) fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < -700.0 {
        return 0.0;
    }
    if x > 700.0 {
        return f64::INFINITY;
    }
    let k = (x / LN_2).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor series to r^12 / 12!; |r| <= 0.35 keeps the truncation far below 1 ulp.
    let mut p = 1.0 / 479_001_600.0;
    for n in (1..12).rev() {
        p = p * r + 1.0 / factorial(n);
    }
    let p = p * r + 1.0;
    p * pow2(k as i32)
}

/// `n!` for small `n`, as an exact float.
fn factorial(n: u32) -> f64 {
    (1..=n).fold(1.0, |acc, i| acc * i as f64)
}

/// `2^k` for `-1022 <= k <= 1023`, built from the exponent bits.
fn pow2(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// Natural logarithm for `x > 0` (returns -inf for 0 and NaN for negative input).
pub(crate) fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let (mut x, mut e) = (x, 0i32);
    if x < f64::MIN_POSITIVE {
        x *= pow2(54);
        e -= 54;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), |s| <= 0.172: odd series to s^21.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 21.0;
    for n in (0..10).rev() {
        p = p * s2 + 1.0 / (2 * n + 1) as f64;
    }
    e as f64 * LN2_HI + (e as f64 * LN2_LO + 2.0 * s * p)
}

/// Natural logarithm of a positive normal number to about 1e-7 relative (a short series; for
/// per-pixel log compression).
pub(crate) fn ln_fast(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (0.2 + s2 * (1.0 / 7.0 + s2 / 9.0))));
    e as f64 * LN_2 + series
}

/// Sine, accurate to about 1e-15 absolute for moderate arguments.
pub(crate) fn sin(x: f64) -> f64 {
    let two_pi = 2.0 * PI;
    let mut r = x - (x / two_pi).round() * two_pi;
    if r > FRAC_PI_2 {
        r = PI - r;
    } else if r < -FRAC_PI_2 {
        r = -PI - r;
    }
    // Odd Taylor series to r^19 / 19! on |r| <= pi/2.
    let r2 = r * r;
    let mut p = 0.0;
    for n in (0..10).rev() {
        let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
        p = p * r2 + sign / factorial(2 * n + 1);
    }
    r * p
}

/// Cosine, via `sin(x + pi/2)`.
pub(crate) fn cos(x: f64) -> f64 {
    sin(x + FRAC_PI_2)
}

/// SplitMix64 finaliser: a fixed bijective 64-bit mix.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_closely() {
        for i in -2000..2000 {
            let x = i as f64 * 0.0137;
            assert!((exp(x) - x.exp()).abs() <= 1e-13 * x.exp(), "exp {x}");
            assert!((sin(x) - x.sin()).abs() < 1e-12, "sin {x}");
            assert!((cos(x) - x.cos()).abs() < 1e-12, "cos {x}");
            let y = (i as f64 * 0.01).exp();
            assert!((ln(y) - y.ln()).abs() < 1e-13, "ln {y}");
            assert!((ln_fast(y) - y.ln()).abs() < 1e-7, "ln_fast {y}");
        }
        assert!((ln(1e-310) - 1e-310f64.ln()).abs() < 1e-12);
    }
}
