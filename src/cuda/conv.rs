//! Convolutions through cuDNN, each shape's descriptors and algorithm made once and one
//! workspace per device kept between calls. The default for f16 and bf16; f32 keeps candle's
//! im2col and cuBLAS product. Measured on an H200 (BENCHMARKS.md, session 12), against im2col:
//! U-Net step 512 f16 39.4 -> 30.7 ms, bf16 39.7 -> 31.5 ms, VAE decode 512 f16 115.5 ->
//! 30.8 ms; but U-Net step 256 f16 13.9 -> 23.4 ms in one lease and 12.4 -> 15.2 ms in
//! another (open), and f32 U-Net 90.8 -> 98.9 ms (VAE 165.5 -> 107.4 ms).
//! `SDGEN_CUDA_CONV=cudnn` or `=im2col` picks one for every type. `SDGEN_CUDNN_ALGO=timed`
//! chooses each shape's algorithm by timing them all ([`choose_by_time`], torch's
//! `cudnn.benchmark`): measured no faster at 512 and ~1 s more at start-up (session 12), so
//! cuDNN's heuristic first choice is the default.
//!
//! Why not candle's own `cudnn` feature: it builds the descriptors, asks cuDNN's heuristics and
//! allocates and zeroes a workspace on every call, and computes f16 in f16; on an H200 it made
//! the f16 U-Net step 77 -> 220 ms while f32 went 105 -> 84 ms and the VAE 197 -> 76 ms
//! (BENCHMARKS.md, session 6). Here f16 and bf16 accumulate in f32 on the tensor cores (as torch
//! asks cuDNN to), and the per-call work is one launch. f32 runs in full f32 (cuDNN's FMA math,
//! no TF32), like candle's f32 products: `--dtype f32` on the GPU is the exact mode, held to 2/255
//! of diffusers on the CPU, where torch on a GPU would allow TF32 in its convolutions.

use super::launch::view;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaStorageSlice as S, DeviceId};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Whether convolutions of `dtype` on CUDA go through [`conv2d`]: f16 and bf16, unless
/// `SDGEN_CUDA_CONV` says `cudnn` (all) or `im2col` (none).
pub fn conv_takes(dtype: DType) -> bool {
    static CHOICE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let choice = CHOICE.get_or_init(|| match std::env::var("SDGEN_CUDA_CONV").as_deref() {
        Ok("cudnn") => Some(true),
        Ok("im2col") => Some(false),
        _ => None,
    });
    choice.unwrap_or(matches!(dtype, DType::F16 | DType::BF16))
}

/// Whether each shape's algorithm is chosen by timing them all (`SDGEN_CUDNN_ALGO=timed`)
/// rather than by cuDNN's heuristic first choice.
fn timed_by_default() -> bool {
    static TIMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TIMED.get_or_init(|| std::env::var("SDGEN_CUDNN_ALGO").as_deref() == Ok("timed"))
}

/// `nn.Conv2d` without its bias: x (b, cin, h, w), weight (cout, cin, kh, kw), groups 1,
/// dilation 1, the same padding and stride on both axes.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_with(x, weight, padding, stride, timed_by_default())
}

/// [`conv2d`] with the algorithms timed (`timed`) or cuDNN's heuristic choice.
pub fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    timed: bool,
) -> Result<Tensor> {
    if x.dtype() != weight.dtype() || !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!(
            "cuDNN convolution of {:?} by {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    x.contiguous()?.apply_op2_no_bwd(
        &weight.contiguous()?,
        &Conv {
            padding,
            stride,
            timed,
        },
    )
}

fn cudnn_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

struct Conv {
    padding: usize,
    stride: usize,
    /// Choose each shape's algorithm by timing them all ([`choose_by_time`]) rather than by
    /// cuDNN's heuristic first choice.
    timed: bool,
}

/// One shape's descriptors and algorithm.
struct Plan<T: CudnnDataType, C: CudnnDataType> {
    conv: ConvDescriptor<C>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

impl<T: CudnnDataType, C: CudnnDataType> Plan<T, C> {
    /// The forward convolution of the plan's descriptors.
    fn forward(&self) -> ConvForward<'_, T, C, T> {
        ConvForward {
            conv: &self.conv,
            x: &self.x,
            w: &self.w,
            y: &self.y,
        }
    }
}

/// (device, type, x dims, w dims, padding, stride, timed)
type Key = (DeviceId, DType, [usize; 4], [usize; 4], usize, usize, bool);

// cuDNN's handles and descriptors are neither Send nor Sync: kept per thread, as candle does.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<Key, Box<dyn Any>>> = RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(cudnn_error)?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

impl Conv {
    fn plan<T: CudnnDataType, C: CudnnDataType>(
        &self,
        dev: &CudaDevice,
        x: [usize; 4],
        w: [usize; 4],
        y: [usize; 4],
    ) -> Result<Plan<T, C>> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let i = |d: [usize; 4]| d.map(|v| v as i32);
        let cudnn = handle(dev)?;
        let (p, s) = (self.padding as i32, self.stride as i32);
        let mut conv = cudnn
            .create_conv2d::<C>(
                [p, p],
                [s, s],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(cudnn_error)?;
        let math = if T::DATA_TYPE == sys::cudnnDataType_t::CUDNN_DATA_FLOAT {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        conv.set_math_type(math).map_err(cudnn_error)?;
        let x = cudnn
            .create_4d_tensor::<T>(NCHW, i(x))
            .map_err(cudnn_error)?;
        let w = cudnn
            .create_4d_filter::<T>(NCHW, i(w))
            .map_err(cudnn_error)?;
        let y = cudnn
            .create_4d_tensor::<T>(NCHW, i(y))
            .map_err(cudnn_error)?;
        let fwd = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        let algo = fwd.pick_algorithm().map_err(cudnn_error)?;
        let workspace = fwd.get_workspace_size(algo).map_err(cudnn_error)?;
        Ok(Plan {
            conv,
            x,
            w,
            y,
            algo,
            workspace,
        })
    }

    /// Runs the convolution of `x` (dims `xd`) by `w` (dims `wd`) into a new (b, cout, ho, wo).
    #[allow(clippy::too_many_arguments)]
    fn run<T, C>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: CudaView<T>,
        w: CudaView<T>,
        xd: [usize; 4],
        wd: [usize; 4],
        yd: [usize; 4],
    ) -> Result<CudaSlice<T>>
    where
        T: CudnnDataType + DeviceRepr + WithDType,
        C: CudnnDataType + 'static,
    {
        let key: Key = (
            dev.id(),
            dtype,
            xd,
            wd,
            self.padding,
            self.stride,
            self.timed,
        );
        // SAFETY: every element is written by the convolution (beta 0).
        let mut out = unsafe { dev.alloc::<T>(yd.iter().product())? };
        let made = PLANS.with(|p| p.borrow().contains_key(&key));
        if !made {
            let mut plan = self.plan::<T, C>(dev, xd, wd, yd)?;
            if self.timed {
                choose_by_time(dev, &mut plan, &x, &w, &mut out)?;
            }
            PLANS.with(|p| p.borrow_mut().insert(key, Box::new(plan)));
        }
        PLANS.with(|plans| -> Result<()> {
            let plans = plans.borrow();
            let plan = plans[&key]
                .downcast_ref::<Plan<T, C>>()
                .expect("a plan is stored under its own types");
            launch(dev, plan, plan.algo, plan.workspace, &x, &w, &mut out)
        })?;
        Ok(out)
    }
}

/// Runs `plan`'s convolution with `algo` (needing `workspace` bytes) into `out`.
fn launch<T, C>(
    dev: &CudaDevice,
    plan: &Plan<T, C>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    x: &CudaView<T>,
    w: &CudaView<T>,
    out: &mut CudaSlice<T>,
) -> Result<()>
where
    T: CudnnDataType + DeviceRepr + WithDType,
    C: CudnnDataType,
{
    WORKSPACES.with(|ws| -> Result<()> {
        let mut ws = ws.borrow_mut();
        let have = ws.get(&dev.id()).map_or(0, |s| s.len());
        if have < workspace.max(1) {
            // the old one is freed in stream order: work queued on it finishes first
            // SAFETY: a workspace is scratch that cuDNN writes before it reads.
            let grown = unsafe { dev.alloc::<u8>(workspace.max(1))? };
            ws.insert(dev.id(), grown);
        }
        let ws = ws.get_mut(&dev.id()).expect("inserted above");
        let fwd = plan.forward();
        // SAFETY: x, w and out are contiguous buffers of the dims the descriptors were made
        // with (the plan's key), of type T; the workspace is at least the size cuDNN asked
        // for this algorithm.
        unsafe {
            fwd.launch::<CudaSlice<u8>, _, _, _>(
                algo,
                Some(ws),
                (T::from_f64(1.0), T::from_f64(0.0)),
                x,
                w,
                out,
            )
        }
        .map_err(cudnn_error)
    })
}

/// The largest workspace an algorithm may ask for when they are timed (torch's cuDNN
/// benchmark caps it too).
const MAX_TIMED_WORKSPACE: usize = 1 << 30;

/// Times every forward algorithm cuDNN runs for `plan`'s shape on the real tensors (a launch
/// to warm up, then the best of three), and keeps the fastest in `plan`: what torch does
/// with `torch.backends.cudnn.benchmark = True`. Once per shape; `out` is scratch here.
fn choose_by_time<T, C>(
    dev: &CudaDevice,
    plan: &mut Plan<T, C>,
    x: &CudaView<T>,
    w: &CudaView<T>,
    out: &mut CudaSlice<T>,
) -> Result<()>
where
    T: CudnnDataType + DeviceRepr + WithDType,
    C: CudnnDataType,
{
    use candle_core::backend::BackendDevice;
    use sys::cudnnConvolutionFwdAlgo_t as A;
    let mut best = (f64::INFINITY, plan.algo, plan.workspace);
    for algo in [
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ] {
        let Ok(workspace) = plan.forward().get_workspace_size(algo) else {
            continue; // not for this shape or type
        };
        if workspace > MAX_TIMED_WORKSPACE || launch(dev, plan, algo, workspace, x, w, out).is_err()
        {
            continue;
        }
        let mut fastest = f64::INFINITY;
        for _ in 0..3 {
            dev.synchronize()?;
            let t = std::time::Instant::now();
            launch(dev, plan, algo, workspace, x, w, out)?;
            dev.synchronize()?;
            fastest = fastest.min(t.elapsed().as_secs_f64());
        }
        if fastest < best.0 {
            best = (fastest, algo, workspace);
        }
    }
    (plan.algo, plan.workspace) = (best.1, best.2);
    Ok(())
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "sdgen-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("sdgen's cuDNN convolution runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let (b, cin, h, wi) = xl.shape().dims4()?;
        let (cout, wcin, kh, kw) = wl.shape().dims4()?;
        let (p, s) = (self.padding, self.stride);
        if wcin != cin || h + 2 * p < kh || wi + 2 * p < kw || s == 0 {
            candle_core::bail!("convolution of {:?} by {:?}", xl.shape(), wl.shape());
        }
        let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wi + 2 * p - kw) / s + 1);
        let (xd, wd, yd) = ([b, cin, h, wi], [cout, cin, kh, kw], [b, cout, ho, wo]);
        let slice = match (&x.slice, &w.slice) {
            (S::F32(x), S::F32(w)) => S::F32(self.run::<f32, f32>(
                dev,
                DType::F32,
                view(x, xl)?,
                view(w, wl)?,
                xd,
                wd,
                yd,
            )?),
            (S::F16(x), S::F16(w)) => S::F16(self.run::<half::f16, f32>(
                dev,
                DType::F16,
                view(x, xl)?,
                view(w, wl)?,
                xd,
                wd,
                yd,
            )?),
            (S::BF16(x), S::BF16(w)) => S::BF16(self.run::<half::bf16, f32>(
                dev,
                DType::BF16,
                view(x, xl)?,
                view(w, wl)?,
                xd,
                wd,
                yd,
            )?),
            _ => candle_core::bail!("cuDNN convolution of mixed or unsupported types"),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from(yd.to_vec()),
        ))
    }
}
