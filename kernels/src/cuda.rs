//! The kernels on an NVIDIA GPU (feature `cuda`): CUDA C sources in
//! `kernels/cuda/`, compiled at run time with NVRTC; GEMMs through cuBLAS
//! (bf16 inputs, f32 accumulation). Driver, NVRTC and cuBLAS are loaded
//! dynamically, so this builds everywhere, and [`Gpu::new`] says what is
//! missing on a machine without them.

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use half::bf16;

use crate::cpu::attention::KvCache;
use crate::cpu::ffn::Expert;
use crate::cpu::layout::{rank_of, Entry, RankBuffer};
use crate::cpu::router::Route;
use crate::LayerShape;

/// Prepended to every source.
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// Every CUDA source: (file, text, kernels it defines).
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "rmsnorm.cu",
        include_str!("../cuda/rmsnorm.cu"),
        &["rmsnorm"],
    ),
    ("rope.cu", include_str!("../cuda/rope.cu"), &["rope"]),
    (
        "attention.cu",
        include_str!("../cuda/attention.cu"),
        &["attention"],
    ),
    (
        "router.cu",
        include_str!("../cuda/router.cu"),
        &["router_topk"],
    ),
    (
        "permute.cu",
        include_str!("../cuda/permute.cu"),
        &["permute_rows"],
    ),
    (
        "combine.cu",
        include_str!("../cuda/combine.cu"),
        &["combine_rows", "f32_to_bf16"],
    ),
    (
        "swiglu.cu",
        include_str!("../cuda/swiglu.cu"),
        &["swiglu_act"],
    ),
];

/// Why the GPU path cannot run, or failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC (libnvrtc.so) could not be loaded: install the CUDA toolkit or PyPI's nvidia-cuda-nvrtc-cu12 and put its lib/ on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("no CUDA driver (libcuda.so): this machine has no NVIDIA GPU driver")]
    NoDriver,
    #[error("compiling {file} for {arch}: {detail}")]
    Compile {
        file: String,
        arch: String,
        detail: String,
    },
    #[error("CUDA: {0}")]
    Driver(String),
}

fn drv(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// Compiles one source (with [`COMMON`]) to PTX for `arch`, e.g. "compute_90".
pub fn compile(file: &str, src: &str, arch: &'static str) -> Result<String, CudaError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(file.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts)
        .map(|p| p.to_src())
        .map_err(|e| CompileError(file, arch, e).into())
}

struct CompileError<'a>(&'a str, &'static str, cudarc::nvrtc::CompileError);

impl From<CompileError<'_>> for CudaError {
    fn from(e: CompileError<'_>) -> Self {
        CudaError::Compile {
            file: e.0.into(),
            arch: e.1.into(),
            detail: format!("{:?}", e.2),
        }
    }
}

/// The kernels loaded on GPU 0.
pub struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: std::collections::HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    pub name: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).finish()
    }
}

fn cfg(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

fn bits(x: &[bf16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn from_bits(x: Vec<u16>) -> Vec<bf16> {
    x.into_iter().map(bf16::from_bits).collect()
}

impl Gpu {
    /// Opens GPU 0 and compiles every kernel for its architecture.
    pub fn new() -> Result<Self, CudaError> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(0).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let name = ctx.name().map_err(drv)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(drv)?;
        let mut funcs = std::collections::HashMap::new();
        let mut modules = Vec::new();
        for (file, src, names) in SOURCES {
            let module = ctx
                .load_module(Ptx::from_src(compile(file, src, arch)?))
                .map_err(drv)?;
            for n in *names {
                funcs.insert(*n, module.load_function(n).map_err(drv)?);
            }
            modules.push(module);
        }
        Ok(Self {
            stream,
            blas,
            funcs,
            _modules: modules,
            name,
        })
    }

    fn up<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.stream.memcpy_stod(x).map_err(drv)
    }

    fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        self.stream.memcpy_dtov(x).map_err(drv)
    }

    /// `c (n x m, f32) = a (n x k, bf16) . w^T` with `w` of `m x k` (bf16), row-major.
    fn gemm(
        &self,
        a: &CudaSlice<u16>,
        n: usize,
        k: usize,
        w: &CudaSlice<u16>,
        m: usize,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pw, _rw) = w.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        // Row-major C = A W^T is column-major C^T = W A^T: cuBLAS computes
        // (m x n) = op(W) (m x k) * (k x n) with W stored k-major (transposed).
        // SAFETY: every pointer is a live device buffer of the sizes above.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                pw as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                pa as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                (&beta as *const f32).cast(),
                pc as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                m as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(drv)
    }

    pub fn rmsnorm(&self, x: &[bf16], w: &[bf16], eps: f32) -> Result<Vec<bf16>, CudaError> {
        let h = w.len();
        let n = x.len() / h;
        let (dx, dw) = (self.up(&bits(x))?, self.up(&bits(w))?);
        let mut dy = self.stream.alloc_zeros::<u16>(x.len()).map_err(drv)?;
        let mut b = self.stream.launch_builder(&self.funcs["rmsnorm"]);
        let h_i32 = h as i32;
        b.arg(&dx).arg(&dw).arg(&mut dy).arg(&h_i32).arg(&eps);
        // SAFETY: argument types and buffer sizes match the kernel's signature.
        unsafe { b.launch(cfg((n as u32, 1), 256, 0)) }.map_err(drv)?;
        Ok(from_bits(self.down(&dy)?))
    }

    pub fn rope(
        &self,
        x: &[bf16],
        heads: usize,
        head_dim: usize,
        pos: &[u32],
        theta: f32,
    ) -> Result<Vec<bf16>, CudaError> {
        let mut dx = self.up(&bits(x))?;
        let dp = self.up(pos)?;
        let mut b = self.stream.launch_builder(&self.funcs["rope"]);
        let heads_i32 = heads as i32;
        let head_dim_i32 = head_dim as i32;
        b.arg(&mut dx)
            .arg(&dp)
            .arg(&heads_i32)
            .arg(&head_dim_i32)
            .arg(&theta);
        // SAFETY: as above.
        unsafe { b.launch(cfg((pos.len() as u32, heads as u32), 64, 0)) }.map_err(drv)?;
        Ok(from_bits(self.down(&dx)?))
    }

    pub fn attention(
        &self,
        q: &[bf16],
        caches: &[KvCache],
        s: &LayerShape,
    ) -> Result<Vec<bf16>, CudaError> {
        let (mut k, mut v, mut off, mut len) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for c in caches {
            off.push((k.len() / (s.kv_heads * s.head_dim)) as i32);
            len.push(c.len as i32);
            k.extend(bits(&c.k));
            v.extend(bits(&c.v));
        }
        let max_len = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let (dq, dk, dv, doff, dlen) = (
            self.up(&bits(q))?,
            self.up(&k)?,
            self.up(&v)?,
            self.up(&off)?,
            self.up(&len)?,
        );
        let mut dout = self.stream.alloc_zeros::<u16>(q.len()).map_err(drv)?;
        let mut b = self.stream.launch_builder(&self.funcs["attention"]);
        b.arg(&dq)
            .arg(&dk)
            .arg(&dv)
            .arg(&doff)
            .arg(&dlen)
            .arg(&mut dout);
        let heads_i32 = s.heads as i32;
        let kv_heads_i32 = s.kv_heads as i32;
        let head_dim_i32 = s.head_dim as i32;
        b.arg(&heads_i32).arg(&kv_heads_i32).arg(&head_dim_i32);
        // SAFETY: as above; shared memory holds one score per cached token.
        unsafe {
            b.launch(cfg(
                (caches.len() as u32, s.heads as u32),
                128,
                (max_len * 4) as u32,
            ))
        }
        .map_err(drv)?;
        Ok(from_bits(self.down(&dout)?))
    }

    pub fn route(
        &self,
        x: &[bf16],
        hidden: usize,
        w: &[bf16],
        experts: usize,
        k: usize,
    ) -> Result<Vec<Route>, CudaError> {
        let n = x.len() / hidden;
        let (dx, dw) = (self.up(&bits(x))?, self.up(&bits(w))?);
        let mut logits = self.stream.alloc_zeros::<f32>(n * experts).map_err(drv)?;
        self.gemm(&dx, n, hidden, &dw, experts, &mut logits)?;
        let mut de = self.stream.alloc_zeros::<i32>(n * k).map_err(drv)?;
        let mut dwt = self.stream.alloc_zeros::<f32>(n * k).map_err(drv)?;
        let mut b = self.stream.launch_builder(&self.funcs["router_topk"]);
        let n_i32 = n as i32;
        let experts_i32 = experts as i32;
        let k_i32 = k as i32;
        b.arg(&logits)
            .arg(&n_i32)
            .arg(&experts_i32)
            .arg(&k_i32)
            .arg(&mut de)
            .arg(&mut dwt);
        // SAFETY: as above.
        unsafe { b.launch(cfg((n.div_ceil(128) as u32, 1), 128, 0)) }.map_err(drv)?;
        let (e, wt) = (self.down(&de)?, self.down(&dwt)?);
        Ok((0..n)
            .map(|t| Route {
                experts: e[t * k..(t + 1) * k].iter().map(|&x| x as usize).collect(),
                weights: wt[t * k..(t + 1) * k].to_vec(),
            })
            .collect())
    }

    /// The dispatch layout: the index map on the host (a counting sort, as
    /// on the CPU), the row gather on the GPU.
    pub fn permute(
        &self,
        x: &[bf16],
        hidden: usize,
        routes: &[Route],
        experts: usize,
        ranks: usize,
    ) -> Result<Vec<RankBuffer>, CudaError> {
        let dx = self.up(&bits(x))?;
        let mut out = Vec::with_capacity(ranks);
        for r in 0..ranks {
            let mut entries = Vec::new();
            for e in (0..experts).filter(|&e| rank_of(e, experts, ranks) == r) {
                for (t, route) in routes.iter().enumerate() {
                    for (&ex, &w) in route.experts.iter().zip(&route.weights) {
                        if ex == e {
                            entries.push(Entry {
                                token: t,
                                expert: e,
                                weight: w,
                            });
                        }
                    }
                }
            }
            let rows = if entries.is_empty() {
                Vec::new()
            } else {
                let src: Vec<i32> = entries.iter().map(|e| e.token as i32).collect();
                let dsrc = self.up(&src)?;
                let mut dout = self
                    .stream
                    .alloc_zeros::<u16>(entries.len() * hidden)
                    .map_err(drv)?;
                let mut b = self.stream.launch_builder(&self.funcs["permute_rows"]);
                let rows_i32 = entries.len() as i32;
                let hidden_i32 = hidden as i32;
                b.arg(&dx)
                    .arg(&dsrc)
                    .arg(&mut dout)
                    .arg(&rows_i32)
                    .arg(&hidden_i32);
                // SAFETY: as above.
                unsafe { b.launch(cfg((entries.len() as u32, 1), 256, 0)) }.map_err(drv)?;
                from_bits(self.down(&dout)?)
            };
            out.push(RankBuffer { rows, entries });
        }
        Ok(out)
    }

    pub fn combine(
        &self,
        outputs: &[&[bf16]],
        plans: &[RankBuffer],
        tokens: usize,
        hidden: usize,
    ) -> Result<Vec<bf16>, CudaError> {
        let mut acc = self
            .stream
            .alloc_zeros::<f32>(tokens * hidden)
            .map_err(drv)?;
        for (rows, plan) in outputs.iter().zip(plans) {
            if plan.entries.is_empty() {
                continue;
            }
            let tok: Vec<i32> = plan.entries.iter().map(|e| e.token as i32).collect();
            let wt: Vec<f32> = plan.entries.iter().map(|e| e.weight).collect();
            let (dr, dt, dw) = (self.up(&bits(rows))?, self.up(&tok)?, self.up(&wt)?);
            let mut b = self.stream.launch_builder(&self.funcs["combine_rows"]);
            let tok_len_i32 = tok.len() as i32;
            let hidden_i32 = hidden as i32;
            b.arg(&dr)
                .arg(&dt)
                .arg(&dw)
                .arg(&mut acc)
                .arg(&tok_len_i32)
                .arg(&hidden_i32);
            // SAFETY: as above.
            unsafe { b.launch(cfg((tok.len() as u32, 1), 256, 0)) }.map_err(drv)?;
        }
        let n = tokens * hidden;
        let mut dy = self.stream.alloc_zeros::<u16>(n.max(1)).map_err(drv)?;
        let mut b = self.stream.launch_builder(&self.funcs["f32_to_bf16"]);
        let n_i32 = n as i32;
        b.arg(&acc).arg(&mut dy).arg(&n_i32);
        // SAFETY: as above.
        unsafe { b.launch(cfg((n.div_ceil(256) as u32, 1), 256, 0)) }.map_err(drv)?;
        let mut y = from_bits(self.down(&dy)?);
        y.truncate(n);
        Ok(y)
    }

    /// The SwiGLU expert: three cuBLAS GEMMs around the activation kernel.
    pub fn swiglu(&self, e: &Expert, x: &[bf16]) -> Result<Vec<bf16>, CudaError> {
        let n = x.len() / e.hidden;
        if n == 0 {
            return Ok(Vec::new());
        }
        let dx = self.up(&bits(x))?;
        let (dg_w, du_w, dd_w) = (
            self.up(&bits(&e.gate))?,
            self.up(&bits(&e.up))?,
            self.up(&bits(&e.down))?,
        );
        let mut g = self.stream.alloc_zeros::<f32>(n * e.ffn).map_err(drv)?;
        let mut u = self.stream.alloc_zeros::<f32>(n * e.ffn).map_err(drv)?;
        self.gemm(&dx, n, e.hidden, &dg_w, e.ffn, &mut g)?;
        self.gemm(&dx, n, e.hidden, &du_w, e.ffn, &mut u)?;
        let mut a = self.stream.alloc_zeros::<u16>(n * e.ffn).map_err(drv)?;
        let mut b = self.stream.launch_builder(&self.funcs["swiglu_act"]);
        let n_ffn_i32 = (n * e.ffn) as i32;
        b.arg(&g).arg(&u).arg(&mut a).arg(&n_ffn_i32);
        // SAFETY: as above.
        unsafe { b.launch(cfg(((n * e.ffn).div_ceil(256) as u32, 1), 256, 0)) }.map_err(drv)?;
        let mut y = self.stream.alloc_zeros::<f32>(n * e.hidden).map_err(drv)?;
        self.gemm(&a, n, e.ffn, &dd_w, e.hidden, &mut y)?;
        Ok(self.down(&y)?.into_iter().map(bf16::from_f32).collect())
    }

    /// Device copy bandwidth (bytes read + written per second) of a
    /// `bytes`-byte device-to-device copy, best of `reps`.
    pub fn bench_copy(&self, bytes: usize, reps: usize) -> Result<f64, CudaError> {
        let src = self.stream.alloc_zeros::<u8>(bytes).map_err(drv)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes).map_err(drv)?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) + 1 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst).map_err(drv)?;
            self.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * bytes as f64 / best)
    }

    /// cuBLAS's rate (flop/s) on a square bf16 GEMM of side `n`, best of `reps`.
    pub fn bench_gemm(&self, n: usize, reps: usize) -> Result<f64, CudaError> {
        let a = self.stream.alloc_zeros::<u16>(n * n).map_err(drv)?;
        let b = self.stream.alloc_zeros::<u16>(n * n).map_err(drv)?;
        let mut c = self.stream.alloc_zeros::<f32>(n * n).map_err(drv)?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) + 1 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.gemm(&a, n, n, &b, n, &mut c)?;
            self.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * n * n) as f64 / best)
    }

    /// The SwiGLU expert on `tokens` tokens with everything already on the
    /// device: seconds per call, best of `reps`.
    pub fn bench_expert(&self, e: &Expert, tokens: usize, reps: usize) -> Result<f64, CudaError> {
        let n = tokens.max(1);
        let dx = self.up(&vec![0x3f80u16; n * e.hidden])?;
        let (gw, uw, dw) = (
            self.up(&bits(&e.gate))?,
            self.up(&bits(&e.up))?,
            self.up(&bits(&e.down))?,
        );
        let mut g = self.stream.alloc_zeros::<f32>(n * e.ffn).map_err(drv)?;
        let mut u = self.stream.alloc_zeros::<f32>(n * e.ffn).map_err(drv)?;
        let mut a = self.stream.alloc_zeros::<u16>(n * e.ffn).map_err(drv)?;
        let mut y = self.stream.alloc_zeros::<f32>(n * e.hidden).map_err(drv)?;
        let count = (n * e.ffn) as i32;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) + 1 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.gemm(&dx, n, e.hidden, &gw, e.ffn, &mut g)?;
            self.gemm(&dx, n, e.hidden, &uw, e.ffn, &mut u)?;
            let mut b = self.stream.launch_builder(&self.funcs["swiglu_act"]);
            b.arg(&g).arg(&u).arg(&mut a).arg(&count);
            // SAFETY: argument types and buffer sizes match the kernel.
            unsafe { b.launch(cfg(((n * e.ffn).div_ceil(256) as u32, 1), 256, 0)) }.map_err(drv)?;
            self.gemm(&a, n, e.ffn, &dw, e.hidden, &mut y)?;
            self.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(drv)
    }
}
