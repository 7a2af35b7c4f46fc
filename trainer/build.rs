//! With the `cuda` feature: link cudart statically (README, "GPU machines").
//!
//! candle-kernels asks for `-l dylib=cudart` without a search path, and the CUDA wheels ship only
//! `libcudart.so.13`. Pointing ld at a folder whose `libcudart.a` is the toolkit's
//! `libcudart_static.a` makes it take the static archive, so the binary needs no libcudart at run
//! time (it dlopens libcuda/cublas/cublasLt/curand through cudarc's dynamic loading).
//! Also compiles our own kernels (src/kernels/udi_kernels.cu) to PTX with the same nvcc
//! (`$OUT_DIR/udi_kernels.ptx`, read by `trainer::kernels` through `include_str!`), and checks
//! the PTX with `ptxas -arch=sm_90` when the toolkit has ptxas, so a kernel that does not compile
//! fails the build and not the first run on a GPU.
//! Without the feature this is a no-op.
use std::env;
use std::path::PathBuf;

const KERNELS_CU: &str = "src/kernels/udi_kernels.cu";

/// nvcc → PTX for compute capability 9.0 (H100/H200; a CUDA 13.0 driver, 580 or later, JIT-compiles
/// PTX ISA ≤ 9.0, which CUDA 13.0's nvcc emits), then `ptxas -arch=sm_90` as a syntax/resource check.
fn compile_ptx(root: &std::path::Path, ptx: &std::path::Path) {
    let nvcc = env::var_os("NVCC")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("bin/nvcc"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(KERNELS_CU)
        .arg("-o")
        .arg(ptx)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {KERNELS_CU}");
    let ptxas = nvcc.with_file_name("ptxas");
    if ptxas.is_file() {
        let cubin = ptx.with_extension("cubin");
        let status = std::process::Command::new(&ptxas)
            .arg(format!("-arch=sm_{cap}"))
            .arg(ptx)
            .arg("-o")
            .arg(&cubin)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
        assert!(status.success(), "ptxas rejected the PTX of {KERNELS_CU}");
    }
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    println!("cargo::rerun-if-env-changed=CANDLE_KERNELS_CHECK_ONLY");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-changed={KERNELS_CU}");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let ptx = out_dir.join("udi_kernels.ptx");
    // CI's toolchain-free `cargo check --features cuda` (scripts/test.sh): nothing gets linked,
    // and the PTX is an empty string (such a build cannot link, see vendor/README.md).
    if env::var("CANDLE_KERNELS_CHECK_ONLY").is_ok_and(|v| v == "1") {
        std::fs::write(&ptx, "").expect("write empty PTX");
        return;
    }
    let root = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .find_map(env::var_os)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "the `cuda` feature needs CUDA_ROOT: run `bash scripts/cuda-toolchain.sh` and \
                 `source <(bash scripts/cuda-toolchain.sh --env)` (README, section \"GPU machines\")"
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
    compile_ptx(&root, &ptx);

    let dir = out_dir.join("cudart-static");
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
