//! Runs `src/kernels/udi_kernels.cu` on the CPU: builds it with the system C++ compiler against
//! the CUDA emulation in `src/kernels/emu/` into a shared library (cached under the cargo target
//! dir, keyed by the sources, compiler and flags), loads it, and launches kernels by name on
//! guarded buffers.
//!
//! Every buffer has a sentinel-filled margin on both sides (NaN patterns, so that an
//! out-of-bounds read shows up as a NaN result); after every launch the margins must be intact
//! and the inputs unchanged. Outputs start as sentinels, so a test can assert that each element
//! was written.
//!
//! Without a compiler the tests pass after saying so, unless `UDI_CUDA_EMU_REQUIRED` is set
//! (scripts/test.sh sets it). `UDI_CUDA_EMU_SANITIZE=thread|address|undefined` builds the library with that sanitizer;
//! thread and address need their runtime preloaded (scripts/cuda-emu-sanitize.sh does it).
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use half::bf16;
use std::ffi::{c_char, c_int, c_void, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use trainer::kernels::geometry::Geometry;

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    *mut *mut c_void,
    *const c_char,
    *mut c_char,
    usize,
) -> c_int;

pub struct Emu {
    launch: LaunchFn,
    _lib: libloading::Library,
}

/// The library, or None (after saying so on stderr) where there is no C++ compiler.
pub fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Option<Emu>> = OnceLock::new();
    EMU.get_or_init(|| {
        let lib = build()?;
        // SAFETY: our own library; its only export has the signature above.
        unsafe {
            let l = libloading::Library::new(&lib)
                .unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
            let launch = *l
                .get::<LaunchFn>(b"udi_cuda_emu_launch\0")
                .expect("udi_cuda_emu_launch");
            Some(Emu { launch, _lib: l })
        }
    })
    .as_ref()
}

/// Said outside the test harness's capture, so that a skip is visible in a passing run.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h = (*h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
}

fn build() -> Option<PathBuf> {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kernels");
    let emu = kernels.join("emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let version = match Command::new(&cxx).arg("--version").output() {
        Ok(o) if o.status.success() => o.stdout,
        _ => {
            let msg = format!(
                "cuda_source_on_cpu: no C++ compiler ({cxx:?}; set CXX): udi_kernels.cu was not run"
            );
            assert!(
                std::env::var_os("UDI_CUDA_EMU_REQUIRED").is_none(),
                "{msg} (UDI_CUDA_EMU_REQUIRED is set)"
            );
            say(&format!("{msg}: SKIPPED"));
            return None;
        }
    };
    let mut flags: Vec<String> = [
        "-std=c++20",
        "-O2",
        "-g",
        "-pthread",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-include",
        "cuda_emu.h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.push(format!("-I{}", emu.display()));
    let sanitize = std::env::var("UDI_CUDA_EMU_SANITIZE").unwrap_or_default();
    match sanitize.as_str() {
        "" => {}
        "thread" => flags.push("-fsanitize=thread".into()),
        "address" => {
            flags.extend(["-fsanitize=address", "-DCUDA_EMU_PLAIN_SHARED"].map(String::from))
        }
        "undefined" => {
            flags.extend(["-fsanitize=undefined", "-fno-sanitize-recover=all"].map(String::from))
        }
        other => panic!("UDI_CUDA_EMU_SANITIZE={other:?}: thread, address or undefined"),
    }
    if matches!(sanitize.as_str(), "thread" | "address") {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let rt = if sanitize == "thread" {
            "libtsan"
        } else {
            "libasan"
        };
        assert!(
            maps.contains(rt),
            "UDI_CUDA_EMU_SANITIZE={sanitize} needs {rt} preloaded: run scripts/cuda-emu-sanitize.sh"
        );
    }
    let mut key = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut key, cxx.as_bytes());
    fnv(&mut key, &version);
    for f in &flags {
        fnv(&mut key, f.as_bytes());
    }
    for src in [
        "udi_kernels.cu",
        "emu/cuda_emu.h",
        "emu/cuda_bf16.h",
        "emu/mma.h",
        "emu/launch.cpp",
    ] {
        let p = kernels.join(src);
        fnv(
            &mut key,
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        );
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu");
    std::fs::create_dir_all(&dir).expect("create the library folder");
    let lib = dir.join(format!("libudi_cuda_emu-{key:016x}.so"));
    if lib.is_file() {
        return Some(lib);
    }
    let tmp = dir.join(format!(
        "libudi_cuda_emu-{key:016x}.{}.tmp",
        std::process::id()
    ));
    let out = Command::new(&cxx)
        .args(&flags)
        .arg(emu.join("launch.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
    assert!(
        out.status.success(),
        "{cxx} could not build udi_kernels.cu against the CUDA emulation:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &lib).expect("rename the library into place");
    Some(lib)
}

/// Element type of a buffer, with its kernel-signature letter and sentinel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    F32,
    Bf16,
    U32,
    F64,
    U8,
}

impl Kind {
    fn size(self) -> usize {
        match self {
            Kind::U8 => 1,
            Kind::Bf16 => 2,
            Kind::F64 => 8,
            _ => 4,
        }
    }
    fn code(self) -> char {
        match self {
            Kind::F32 => 'F',
            Kind::Bf16 => 'B',
            Kind::U32 => 'U',
            Kind::F64 => 'D',
            Kind::U8 => 'b',
        }
    }
    /// A NaN whose payload no arithmetic produces (a quiet NaN result differs).
    fn sentinel(self) -> &'static [u8] {
        match self {
            Kind::U8 => &[0xa5],
            Kind::Bf16 => &[0xa5, 0xff],
            Kind::F64 => &[0xad, 0xdb, 0xba, 0xdb, 0xad, 0xdb, 0xf7, 0xff],
            _ => &[0xad, 0xdb, 0xba, 0xff],
        }
    }
    pub fn of(dt: DType) -> Kind {
        match dt {
            DType::F32 => Kind::F32,
            DType::BF16 => Kind::Bf16,
            DType::U32 => Kind::U32,
            DType::F64 => Kind::F64,
            DType::U8 => Kind::U8,
            d => panic!("no kernel buffers of {d:?}"),
        }
    }
    pub fn dtype(self) -> DType {
        match self {
            Kind::F32 => DType::F32,
            Kind::Bf16 => DType::BF16,
            Kind::U32 => DType::U32,
            Kind::F64 => DType::F64,
            Kind::U8 => DType::U8,
        }
    }
}

/// Margin on each side of a buffer, bytes (keeps the data 256-byte aligned, as cudaMalloc's).
const MARGIN: usize = 256;

/// A device-like buffer: `n` elements of `kind` between two sentinel margins.
pub struct Buf {
    mem: *mut u8,
    layout: std::alloc::Layout,
    pub kind: Kind,
    pub n: usize,
    /// The contents the kernels must leave alone (inputs), checked after every launch.
    frozen: Option<Vec<u8>>,
}

// SAFETY: plain memory owned by the Buf; the tests hand it to one launch at a time.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `raw` with this layout.
        unsafe { std::alloc::dealloc(self.mem, self.layout) }
    }
}

impl Buf {
    fn raw(kind: Kind, n: usize) -> Self {
        let bytes = 2 * MARGIN + n * kind.size();
        let layout = std::alloc::Layout::from_size_align(bytes, 256).unwrap();
        // SAFETY: non-zero size.
        let mem = unsafe { std::alloc::alloc(layout) };
        assert!(!mem.is_null());
        let mut b = Buf {
            mem,
            layout,
            kind,
            n,
            frozen: None,
        };
        let s = kind.sentinel();
        for (i, byte) in b.all_mut().iter_mut().enumerate() {
            *byte = s[i % s.len()];
        }
        b
    }

    fn all(&self) -> &[u8] {
        // SAFETY: the whole allocation, initialised in `raw`.
        unsafe { std::slice::from_raw_parts(self.mem, self.layout.size()) }
    }

    fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `all`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.mem, self.layout.size()) }
    }

    fn data(&self) -> &[u8] {
        &self.all()[MARGIN..MARGIN + self.n * self.kind.size()]
    }

    /// An input holding `t` (f32, bf16, u32 or f64; any shape), which the kernels must not change.
    pub fn input(t: &Tensor) -> Self {
        let kind = Kind::of(t.dtype());
        let t = t.flatten_all().unwrap();
        macro_rules! le_bytes {
            ($ty:ty) => {
                t.to_vec1::<$ty>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            };
        }
        let bytes: Vec<u8> = match kind {
            Kind::F32 => le_bytes!(f32),
            Kind::Bf16 => le_bytes!(bf16),
            Kind::U32 => le_bytes!(u32),
            Kind::F64 => le_bytes!(f64),
            Kind::U8 => t.to_vec1::<u8>().unwrap(),
        };
        let mut b = Buf::raw(kind, bytes.len() / kind.size());
        b.all_mut()[MARGIN..MARGIN + bytes.len()].copy_from_slice(&bytes);
        b.frozen = Some(bytes);
        b
    }

    /// An output of `n` elements, all sentinels until written.
    pub fn output(kind: Kind, n: usize) -> Self {
        Buf::raw(kind, n)
    }

    /// An output the kernel accumulates into (atomicAdd): zeros, as the CUDA path allocates it.
    pub fn zeroed(kind: Kind, n: usize) -> Self {
        let mut b = Buf::raw(kind, n);
        let len = n * kind.size();
        b.all_mut()[MARGIN..MARGIN + len].fill(0);
        b
    }

    /// State the kernel updates in place: starts as `t`, may change.
    pub fn in_out(t: &Tensor) -> Self {
        let mut b = Buf::input(t);
        b.frozen = None;
        b
    }

    fn ptr(&self) -> *mut c_void {
        // SAFETY: inside the allocation.
        unsafe { self.mem.add(MARGIN) as *mut c_void }
    }

    /// Panics unless the margins hold their sentinels and an input is unchanged.
    fn check_guards(&self, what: &str) {
        let s = self.kind.sentinel();
        let end = MARGIN + self.n * self.kind.size();
        let all = self.all();
        for (i, &byte) in all.iter().enumerate() {
            if (i < MARGIN || i >= end) && byte != s[i % s.len()] {
                let off = i as isize - MARGIN as isize;
                panic!(
                    "{what}: wrote outside a buffer of {} {:?} elements, at byte offset {off}",
                    self.n, self.kind
                );
            }
        }
        if let Some(f) = &self.frozen {
            if let Some(i) = f.iter().zip(self.data()).position(|(a, b)| a != b) {
                panic!("{what}: changed input element {}", i / self.kind.size());
            }
        }
    }

    /// Whether element `i` still holds the sentinel (was never written).
    pub fn unwritten(&self, i: usize) -> bool {
        let sz = self.kind.size();
        self.data()[i * sz..(i + 1) * sz] == self.kind.sentinel()[..sz]
    }

    /// Panics unless every element in `range` was written.
    pub fn assert_written(&self, what: &str, range: std::ops::Range<usize>) {
        if let Some(i) = range.clone().find(|&i| self.unwritten(i)) {
            let missing = range.filter(|&i| self.unwritten(i)).count();
            panic!(
                "{what}: element {i} (and {} more) never written",
                missing - 1
            );
        }
    }

    /// Panics unless no element in `range` was written.
    pub fn assert_untouched(&self, what: &str, range: std::ops::Range<usize>) {
        if let Some(i) = range.clone().find(|&i| !self.unwritten(i)) {
            panic!("{what}: element {i} was written");
        }
    }

    /// The contents as a CPU tensor of `shape`.
    pub fn tensor(&self, shape: &[usize]) -> Tensor {
        Tensor::from_raw_buffer(self.data(), self.kind.dtype(), shape, &Device::Cpu).unwrap()
    }
}

/// One kernel launch: arguments in the kernel's order, as the CUDA path pushes them.
pub struct Call<'a> {
    emu: &'a Emu,
    name: String,
    values: Vec<u64>,
    sig: String,
    bufs: Vec<&'a Buf>,
}

impl Emu {
    pub fn call(&self, name: &str) -> Call<'_> {
        Call {
            emu: self,
            name: name.to_string(),
            values: Vec::new(),
            sig: String::new(),
            bufs: Vec::new(),
        }
    }
}

impl<'a> Call<'a> {
    pub fn buf(mut self, b: &'a Buf) -> Self {
        self.values.push(b.ptr() as u64);
        self.sig.push(b.kind.code());
        self.bufs.push(b);
        self
    }
    /// A null pointer where the kernel takes a `kind` pointer.
    pub fn null(mut self, kind: Kind) -> Self {
        self.values.push(0);
        self.sig.push(kind.code());
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.values.push(v as u32 as u64);
        self.sig.push('i');
        self
    }
    pub fn usize(mut self, v: usize) -> Self {
        self.values.push(v as u64);
        self.sig.push('z');
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.values.push(v.to_bits() as u64);
        self.sig.push('f');
        self
    }

    /// Runs the kernel on `g`; panics on an emulation error (a misused barrier, shuffle or WMMA
    /// operand), a write outside a buffer or a changed input.
    pub fn launch(mut self, g: Geometry) {
        let mut ptrs: Vec<*mut c_void> = self
            .values
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        let name = CString::new(self.name.clone()).unwrap();
        let sig = CString::new(self.sig.clone()).unwrap();
        let mut err = vec![0u8; 4096];
        // SAFETY: every pointer argument is a live Buf (or null where the kernel allows it); the
        // signature is checked against the kernel's parameters before the launch.
        let rc = unsafe {
            (self.emu.launch)(
                name.as_ptr(),
                g.grid.as_ptr(),
                g.block.as_ptr(),
                ptrs.as_mut_ptr(),
                sig.as_ptr(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            panic!("{}", String::from_utf8_lossy(&err[..end]));
        }
        for b in &self.bufs {
            b.check_guards(&self.name);
        }
    }
}
