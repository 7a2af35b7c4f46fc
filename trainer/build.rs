//! With the `cuda` feature: link cudart statically (see /work/shared/cuda.md §3, README "GPU").
//!
//! candle-kernels asks for `-l dylib=cudart` without a search path, and the CUDA wheels ship only
//! `libcudart.so.13`. Pointing ld at a folder whose `libcudart.a` is the toolkit's
//! `libcudart_static.a` makes it take the static archive, so the binary needs no libcudart at run
//! time (it dlopens libcuda/cublas/cublasLt/curand through cudarc's dynamic loading).
//! Without the feature this is a no-op.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    println!("cargo::rerun-if-env-changed=CANDLE_KERNELS_CHECK_ONLY");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // CI's toolchain-free `cargo check --features cuda` (scripts/test.sh): nothing gets linked.
    if env::var("CANDLE_KERNELS_CHECK_ONLY").is_ok_and(|v| v == "1") {
        return;
    }
    let root = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .find_map(|k| env::var_os(k))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "the `cuda` feature needs CUDA_ROOT: run `bash scripts/cuda-toolchain.sh` and \
                 `source <(bash scripts/cuda-toolchain.sh --env)` (README, section GPU)"
            )
        });
    let archive = ["lib/libcudart_static.a", "lib64/libcudart_static.a"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no libcudart_static.a under {}/lib or lib64",
                root.display()
            )
        });
    println!("cargo::rerun-if-changed={}", archive.display());

    let dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("cudart-static");
    std::fs::create_dir_all(&dir).expect("create OUT_DIR/cudart-static");
    let link = dir.join("libcudart.a");
    std::fs::copy(&archive, &link)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", archive.display(), link.display()));
    println!("cargo::rustc-link-search=native={}", dir.display());
    // libcudart_static's own dependencies.
    for lib in ["dl", "rt", "pthread"] {
        println!("cargo::rustc-link-lib=dylib={lib}");
    }
}
