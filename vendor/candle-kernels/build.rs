use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    // udi-rs: CI's cheap type-check of `--features cuda` (see vendor/README.md).
    println!("cargo::rerun-if-env-changed=CANDLE_KERNELS_CHECK_ONLY");
    if env::var("CANDLE_KERNELS_CHECK_ONLY").is_ok_and(|v| v == "1") {
        write_check_only(&ptx_path);
        return Ok(());
    }
    let bindings = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;

    bindings.write(&ptx_path)?;

    // udi-rs: the GGUF/MoE kernels below are compiled to SASS and take ~8 of the ~9 minutes of this
    // build script (and ~33 MB of the binary). ViT training never calls them, so by default they are
    // replaced by aborting stubs (same C symbols, see `write_trimmed_stubs`); set
    // CANDLE_KERNELS_GGUF=1 to compile the real ones as upstream does.
    println!("cargo::rerun-if-env-changed=CANDLE_KERNELS_GGUF");
    let full = env::var("CANDLE_KERNELS_GGUF").is_ok_and(|v| v == "1");
    let mut moe_sources: Vec<PathBuf> = if full {
        vec![
            "src/moe/moe_gguf.cu",
            "src/moe/moe_wmma.cu",
            "src/moe/moe_wmma_gguf.cu",
            "src/mmvq_gguf.cu",
            "src/mmq_gguf/mmq_quantize.cu",
            "src/mmq_gguf/mmq_instance_q4_0.cu",
            "src/mmq_gguf/mmq_instance_q4_1.cu",
            "src/mmq_gguf/mmq_instance_q5_0.cu",
            "src/mmq_gguf/mmq_instance_q5_1.cu",
            "src/mmq_gguf/mmq_instance_q8_0.cu",
            "src/mmq_gguf/mmq_instance_q2_k.cu",
            "src/mmq_gguf/mmq_instance_q3_k.cu",
            "src/mmq_gguf/mmq_instance_q4_k.cu",
            "src/mmq_gguf/mmq_instance_q5_k.cu",
            "src/mmq_gguf/mmq_instance_q6_k.cu",
        ]
        .into_iter()
        .map(PathBuf::from)
        .collect()
    } else {
        vec![write_trimmed_stubs(&out_dir)]
    };
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu".into());
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

/// udi-rs: writes `trimmed_stubs.cu`, one `extern "C"` function per symbol declared in src/ffi.rs,
/// each of which prints which kernel was trimmed and aborts. The symbols keep candle-core and
/// candle-nn (quantized matmul, MoE) linking; calling one is a loud error, never a silent one.
fn write_trimmed_stubs(out_dir: &std::path::Path) -> PathBuf {
    println!("cargo::rerun-if-changed=src/ffi.rs");
    let ffi = std::fs::read_to_string("src/ffi.rs").expect("read src/ffi.rs");
    let cutile = env::var_os(CUTILE_FEATURE).is_some();
    let mut names = Vec::new();
    let mut gated = false;
    for line in ffi.lines().map(str::trim) {
        if line.starts_with("#[cfg(feature = \"cutile\")]") {
            gated = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("pub fn ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // moe_align.cu is compiled for real when the cutile feature is on.
            if !(gated && cutile) {
                names.push(name);
            }
        }
        gated = false;
    }
    assert!(!names.is_empty(), "no extern functions found in src/ffi.rs");
    let mut src = String::from(
        "#include <cstdio>\n#include <cstdlib>\n\
         static void trimmed(const char* name) {\n\
         \x20 fprintf(stderr, \"candle-kernels: %s was not compiled (GGUF/MoE kernels are trimmed \"\n\
         \x20   \"in this build; rebuild with CANDLE_KERNELS_GGUF=1)\\n\", name);\n\
         \x20 abort();\n}\n",
    );
    for name in &names {
        src.push_str(&format!(
            "extern \"C\" void {name}() {{ trimmed(\"{name}\"); }}\n"
        ));
    }
    let path = out_dir.join("trimmed_stubs.cu");
    // Rewriting an unchanged file would make cargo rerun this script (and rebuild candle-core) on
    // every build: cudaforge watches its sources.
    if std::fs::read_to_string(&path).ok().as_deref() != Some(src.as_str()) {
        std::fs::write(&path, src).expect("write trimmed_stubs.cu");
    }
    path
}

/// udi-rs: `CANDLE_KERNELS_CHECK_ONLY=1` runs no nvcc: every PTX constant is an empty string and no
/// kernel library is built, so `cargo check --features cuda` needs no CUDA toolchain. Such a build
/// cannot be linked (a library that does not exist is requested), so it can never become a binary
/// with missing kernels.
fn write_check_only(ptx_path: &std::path::Path) {
    let mut names: Vec<String> = std::fs::read_dir("src")
        .expect("read src/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".cu").map(str::to_string))
        .filter(|stem| stem != "mmvq_gguf")
        .collect();
    names.sort();
    let consts: String = names
        .iter()
        .map(|n| format!("pub const {}: &str = \"\";\n", n.to_uppercase()))
        .collect();
    std::fs::write(ptx_path, consts).expect("write ptx.rs");
    println!(
        "cargo:warning=candle-kernels: CANDLE_KERNELS_CHECK_ONLY=1, no kernels compiled: \
         this build can be type-checked, not linked"
    );
    println!("cargo:rustc-link-lib=candle_kernels_check_only_build_cannot_be_linked");
}
