//! The SIMD level of this CPU, detected once per call (the standard library caches the CPUID
//! answers), and passed to the kernels that have several.

/// The instruction sets a kernel may use (each level includes the ones before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Scalar,
    Avx2,
    /// AVX-512 F/BW/VL/DQ, VNNI and VBMI (Ice Lake and later, Zen 4 and later).
    Avx512,
}

impl Simd {
    /// The widest level this CPU has.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            if avx512 && has!("avx512dq") && has!("avx512vnni") && has!("avx512vbmi") {
                return Simd::Avx512;
            }
            if has!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Scalar
    }
}
