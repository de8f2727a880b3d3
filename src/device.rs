//! Where the model computes: the one place that turns the user's `--device` / `--dtype` (or
//! the daemon's `model.device` / `model.dtype`) into a candle device and the towers' dtype.
//!
//! - `auto`: CUDA device 0 when this binary was built with the `cuda` feature and the device
//!   answers (`Device::new_cuda` succeeds), else the CPU. A CUDA build without a working GPU
//!   falls back to the CPU: one `warn` log line with the reason, and the reason travels with
//!   the [`Placement`] into every result (`model.fallback`), the daemon's status, `/healthz`
//!   and `/metrics`.
//! - `cpu`: the CPU.
//! - `cuda` / `cuda:N`: that CUDA device, or a one-line error (never a fallback) when this is
//!   a CPU-only build or the device does not answer.
//!
//! Dtype of the vision tower: `auto` is f16 on CUDA, and on the CPU bf16 where it has
//! AVX512_BF16 (`vdpbf16ps`), else f32; `f32` on CUDA is for parity checks. On the CPU the
//! dtype is the GEMMs' ([`crate::model::gemm`]): bf16 weights and inputs with f32
//! accumulation, activations f32 between GEMMs; `bf16` on a CPU without AVX512_BF16 runs the
//! same rounding emulated (slower; the backend label says `emulated`). LayerNorm statistics are always taken in f32 and softmax
//! accumulates in f32 (see [`crate::model::encoder`]); the MIL pooling and the heads run on the
//! CPU in f32 / f64 whatever the device (45 rows per nodule: not worth a GPU launch).
//!
//! The choice is made once per process ([`init`]) and read by every model load
//! ([`current`]): a CUDA context and its compiled kernels are process-wide, and the daemon's
//! model reloads must land on the same device.

use candle_core::{DType, Device};
use std::sync::Mutex;

/// Errors choosing a device. One line each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// A device name that is not `auto`, `cpu`, `cuda` or `cuda:N`.
    #[error("device `{0}`: expected auto, cpu, cuda or cuda:N")]
    BadDevice(String),
    /// A dtype name that is not `auto`, `f32`, `bf16` or `f16`.
    #[error("dtype `{0}`: expected auto, f32, bf16 or f16")]
    BadDtype(String),
    /// CUDA asked for explicitly in a build without the `cuda` feature.
    #[error("device cuda:{0}: this noduled was built without CUDA support (cargo feature `cuda`); use --device cpu or auto")]
    NotCompiled(usize),
    /// CUDA asked for explicitly, but the device did not answer.
    #[error("device cuda:{ordinal}: CUDA is not available: {reason}")]
    Unavailable {
        /// The device ordinal.
        ordinal: usize,
        /// What the driver said.
        reason: String,
    },
    /// f16 asked for on the CPU.
    #[error("dtype f16 is for CUDA devices; the CPU computes in f32 or bf16 (use --dtype auto, f32 or bf16)")]
    F16OnCpu,
    /// bf16 asked for on a GPU.
    #[error("dtype bf16 is for the CPU; CUDA devices compute in f16 or f32 (use --dtype auto, f16 or f32)")]
    Bf16OnGpu,
}

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 when built with CUDA and it answers, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N, or an error.
    Cuda(usize),
}

impl std::str::FromStr for DeviceRequest {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let bad = || DeviceError::BadDevice(s.to_string());
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse::<usize>().map(Self::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Which dtype the user asked for the vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeRequest {
    /// f16 on CUDA; on the CPU bf16 where it has AVX512_BF16, else f32.
    #[default]
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 GEMMs with f32 accumulation (CPU only; emulated without AVX512_BF16).
    Bf16,
    /// f16 (CUDA only).
    F16,
}

impl std::str::FromStr for DtypeRequest {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(DeviceError::BadDtype(other.to_string())),
        }
    }
}

impl std::fmt::Display for DtypeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::F32 => write!(f, "f32"),
            Self::Bf16 => write!(f, "bf16"),
            Self::F16 => write!(f, "f16"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DeviceRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for DtypeRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The device and dtype the model computes with.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Where the vision tower runs.
    pub device: Device,
    /// The vision tower's dtype: on CUDA its weights' and activations' (f16 or f32); on the
    /// CPU its GEMMs' (f32 or bf16: weights packed in it, activations rounded to it on the
    /// way in, f32 accumulation; LayerNorm, softmax and the residual stream stay f32).
    pub dtype: DType,
    /// Why a CUDA build runs on the CPU (`auto` found no GPU); `None` otherwise.
    pub fallback: Option<String>,
}

impl Placement {
    /// The CPU in f32.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            fallback: None,
        }
    }

    /// `"cpu f32 (avx512f)"`, `"cpu f32 (avx2)"`, `"cpu f32 (candle)"`, `"cpu bf16 (avx512bf16)"`, `"cpu bf16
    /// (emulated)"`, or `"cuda:N f16"` / `"cuda:N f32"`: the `backend` of reports and status
    /// (on the CPU: the GEMM dtype and the kernel that runs it, see [`crate::model::gemm`];
    /// a q8_0 bundle in f32 keeps its q8_0 weights and their kernel).
    pub fn label(&self) -> String {
        use crate::model::gemm::GemmDtype;
        match &self.device {
            Device::Cpu => {
                let gemm = if self.dtype == DType::BF16 {
                    GemmDtype::Bf16
                } else {
                    GemmDtype::F32
                };
                let kernel = match (gemm.kernel_name(), gemm) {
                    (Some(name), _) => name,
                    (None, GemmDtype::F32) => "candle",
                    (None, GemmDtype::Bf16) => "emulated",
                };
                format!("cpu {} ({kernel})", gemm.name())
            }
            Device::Cuda(_) => {
                let n = cuda_ordinal(&self.device);
                format!("cuda:{n} {}", dtype_name(self.dtype))
            }
            other => format!("{other:?}").to_lowercase(),
        }
    }

    /// [`Self::label`] for a model whose base weights are stored in `precision` (a bundle's
    /// `"f32"`, `"f16"` or `"q8_0"`): a q8_0 base in f32 on the CPU keeps its q8_0 weights,
    /// labelled by the kernel that multiplies them ([`crate::model::mapped::Q8Kernel`]):
    /// `"cpu q8_0 (avx2)"` / `"cpu q8_0 (avx512f)"` for the in-house f32 GEMM on dequantised
    /// panels, `"cpu q8_0 (candle)"` for candle's q8_0 matmul (activations quantised too);
    /// every other case is [`Self::label`] (bf16 converts q8_0 to bf16 at load).
    pub fn label_for(&self, precision: &str) -> String {
        if self.device.is_cpu() && self.dtype == DType::F32 && precision == "q8_0" {
            let kernel = crate::model::mapped::Q8Kernel::from_env();
            format!("cpu q8_0 ({})", kernel.label())
        } else {
            self.label()
        }
    }

    /// Whether the tower runs on a GPU.
    pub fn is_gpu(&self) -> bool {
        !self.device.is_cpu()
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// The ordinal of a CUDA device (0 when unknown).
fn cuda_ordinal(device: &Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

/// Opens CUDA device `ordinal`; the error (or a panic in the driver bindings) as one line.
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("built without CUDA support".into());
    }
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(first_line(&e.to_string())),
        Err(panic) => Err(one_line(
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the CUDA bindings panicked"),
        )),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The message without the backtrace candle appends on the following lines (when
/// `RUST_BACKTRACE` is set).
fn first_line(s: &str) -> String {
    one_line(s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s))
}

/// Decides the placement for `device` and `dtype` without storing it (see [`init`]).
pub fn select(device: DeviceRequest, dtype: DtypeRequest) -> Result<Placement, DeviceError> {
    let placement = match device {
        DeviceRequest::Cpu => Placement::cpu(),
        DeviceRequest::Cuda(n) if !cfg!(feature = "cuda") => {
            return Err(DeviceError::NotCompiled(n))
        }
        DeviceRequest::Cuda(n) => match open_cuda(n) {
            Ok(device) => Placement {
                device,
                dtype: DType::F16,
                fallback: None,
            },
            Err(reason) => return Err(DeviceError::Unavailable { ordinal: n, reason }),
        },
        DeviceRequest::Auto if !cfg!(feature = "cuda") => Placement::cpu(),
        DeviceRequest::Auto => match open_cuda(0) {
            Ok(device) => Placement {
                device,
                dtype: DType::F16,
                fallback: None,
            },
            Err(reason) => {
                let reason = format!("CUDA device 0 not available: {reason}");
                tracing::warn!("falling back to the CPU: {reason}");
                Placement {
                    fallback: Some(reason),
                    ..Placement::cpu()
                }
            }
        },
    };
    let bf16_cpu = crate::model::gemm::GemmDtype::Bf16.supported();
    let dtype = match (dtype, placement.is_gpu()) {
        (DtypeRequest::Auto, true) | (DtypeRequest::F16, true) => DType::F16,
        (DtypeRequest::Bf16, true) => return Err(DeviceError::Bf16OnGpu),
        (DtypeRequest::F16, false) if placement.fallback.is_none() => {
            return Err(DeviceError::F16OnCpu)
        }
        (DtypeRequest::Bf16, false) => DType::BF16,
        (DtypeRequest::Auto, false) if bf16_cpu => DType::BF16,
        _ => DType::F32,
    };
    Ok(Placement { dtype, ..placement })
}

static CURRENT: Mutex<Option<Placement>> = Mutex::new(None);

/// Decides the placement (see [`select`]), logs how long opening the device took, and makes
/// it the process's placement for every later model load ([`current`]).
pub fn init(device: DeviceRequest, dtype: DtypeRequest) -> Result<Placement, DeviceError> {
    let started = std::time::Instant::now();
    let placement = select(device, dtype)?;
    tracing::info!(
        requested = %device,
        backend = %placement.label(),
        ms = started.elapsed().as_millis() as u64,
        "compute device chosen"
    );
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(placement.clone());
    Ok(placement)
}

/// The placement [`init`] chose; the CPU in f32 when it was never called.
pub fn current() -> Placement {
    CURRENT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(Placement::cpu)
}

/// The `--device` and `--dtype` options of `score`, `bench` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Compute device: auto (CUDA device 0 when built with CUDA and a GPU answers, else the
    /// CPU), cpu, cuda or cuda:N (an error when not available).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceRequest,
    /// Vision tower dtype: auto (f16 on CUDA; on the CPU bf16 where it has AVX512_BF16, else
    /// f32), f32, bf16 (CPU: bf16 GEMMs, f32 accumulation) or f16 (CUDA only).
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: DtypeRequest,
}

impl DeviceArgs {
    /// [`init`] with these options.
    pub fn init(&self) -> Result<Placement, DeviceError> {
        init(self.device, self.dtype)
    }
}

/// `--device` of the commands (clap value parser).
pub(crate) fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    s.parse().map_err(|e: DeviceError| e.to_string())
}

fn parse_dtype(s: &str) -> Result<DtypeRequest, String> {
    s.parse().map_err(|e: DeviceError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print_back() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceRequest>().unwrap().to_string(), s);
        }
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", ""] {
            let err = bad.parse::<DeviceRequest>().unwrap_err().to_string();
            assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
        }
        for s in ["auto", "f32", "bf16", "f16"] {
            assert_eq!(s.parse::<DtypeRequest>().unwrap().to_string(), s);
        }
        assert!("f8".parse::<DtypeRequest>().is_err());
    }

    #[test]
    fn cpu_is_f32_and_f16_on_cpu_is_refused() {
        let p = select(DeviceRequest::Cpu, DtypeRequest::F32).unwrap();
        assert_eq!(p.dtype, DType::F32);
        assert!(p.label().starts_with("cpu f32 ("), "{}", p.label());
        assert!(p.fallback.is_none());
        let p = select(DeviceRequest::Cpu, DtypeRequest::Bf16).unwrap();
        assert!(p.label().starts_with("cpu bf16 ("), "{}", p.label());
        let auto = select(DeviceRequest::Cpu, DtypeRequest::Auto)
            .unwrap()
            .dtype;
        let bf16 = crate::model::gemm::GemmDtype::Bf16.supported();
        assert_eq!(auto, if bf16 { DType::BF16 } else { DType::F32 });
        let err = select(DeviceRequest::Cpu, DtypeRequest::F16).unwrap_err();
        assert!(matches!(err, DeviceError::F16OnCpu), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_build_auto_is_cpu_and_cuda_is_an_error() {
        let p = select(DeviceRequest::Auto, DtypeRequest::Auto).unwrap();
        assert!(p.label().starts_with("cpu "), "{}", p.label());
        assert!(p.fallback.is_none(), "a CPU build does not fall back");
        let err = select(DeviceRequest::Cuda(1), DtypeRequest::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("device cuda:1: this noduled was built without CUDA"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
