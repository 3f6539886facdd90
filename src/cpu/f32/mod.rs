//! f32 kernels on the CPU: matrix products through `gemm` (built with its AVX-512 kernels),
//! the loops around them written to vectorise. Other float types reach them widened to f32.

pub(crate) mod attention;
pub(crate) mod conv;
pub(crate) mod linear;
pub(crate) mod winograd;
