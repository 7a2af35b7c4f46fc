//! The SIMD level of this CPU, detected once per process, and passed to the kernels that have
//! several.

/// The instruction sets a kernel may use (each level includes the ones before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Scalar,
    Avx2,
    /// AVX-512 F/BW/VL/DQ, VNNI and VBMI (Ice Lake and later, Zen 4 and later).
    Avx512,
}

impl Simd {
    /// The widest level this CPU has, capped by `UDI_SIMD=scalar|avx2|avx512` when set (to
    /// measure or rule out a level; the bytes are the same at every level). Read once.
    pub fn detect() -> Self {
        static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let hw = Self::hardware();
            match std::env::var("UDI_SIMD").ok().as_deref().map(str::trim) {
                None | Some("") => hw,
                Some(v) => match Self::parse(v) {
                    Some(cap) => hw.min(cap),
                    None => {
                        eprintln!("warning: UDI_SIMD={v:?} is not scalar, avx2 or avx512; ignored");
                        hw
                    }
                },
            }
        })
    }

    /// `scalar`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Simd::Scalar),
            "avx2" => Some(Simd::Avx2),
            "avx512" => Some(Simd::Avx512),
            _ => None,
        }
    }

    /// The widest level the CPU supports.
    pub fn hardware() -> Self {
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

#[cfg(test)]
mod tests {
    use super::Simd;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Simd::parse("AVX2"), Some(Simd::Avx2));
        assert_eq!(Simd::parse("scalar"), Some(Simd::Scalar));
        assert_eq!(Simd::parse("avx512"), Some(Simd::Avx512));
        assert_eq!(Simd::parse("sse"), None);
        assert!(Simd::Scalar < Simd::Avx2 && Simd::Avx2 < Simd::Avx512);
        // Without UDI_SIMD in the test environment, the level is the hardware's.
        if std::env::var_os("UDI_SIMD").is_none() {
            assert_eq!(Simd::detect(), Simd::hardware());
        }
    }
}
