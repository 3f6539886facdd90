//! With the `cuda` feature: compiles sdgen's CUDA kernels (`src/cuda/kernels/*.cu`) to PTX for
//! `CUDA_COMPUTE_CAP` (e.g. 90 for H100/H200, as candle's own kernels need it) with the `nvcc`
//! of `NVCC`, `CUDA_ROOT`/`CUDA_HOME` or the PATH; `src/cuda` embeds the PTX. Without the
//! feature it does nothing. `scripts/build-cuda.sh` sets all of this up.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .expect("set CUDA_COMPUTE_CAP (e.g. 90 for H100/H200) to build the CUDA kernels");
    let cap = cap.trim().replace('.', "");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(std::env::var_os)
                .map(|root| PathBuf::from(root).join("bin/nvcc"))
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from("nvcc"))
        });
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let compile = |kernel: &str, ptx: &str, defines: &[String]| {
        let src = format!("src/cuda/kernels/{kernel}.cu");
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
            ])
            .args(defines)
            .arg("-o")
            .arg(out.join(ptx))
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {src}");
    };
    compile("norm", "norm.ptx", &[]);
    compile("geglu", "geglu.ptx", &[]);
    // one module per padded head width, and their list for src/cuda/attention.rs
    let widths: Vec<usize> = (16..=160).step_by(16).collect();
    let mut list = String::from(
        "/// (module name, PTX) of the attention kernels per padded head width 16, 32, ...\n",
    );
    list += &format!("const PTX: [(&str, &str); {}] = [\n", widths.len());
    for dp in &widths {
        let ptx = format!("attention_{dp}.ptx");
        compile("attention", &ptx, &[format!("-DSDGEN_DP={dp}")]);
        list += &format!(
            "    (\"sdgen_attention_{dp}\", include_str!({:?})),\n",
            out.join(&ptx)
        );
    }
    list += &format!(
        "];\n/// The widest head compiled.\nconst MAX_D: usize = {};\n",
        widths[widths.len() - 1]
    );
    std::fs::write(out.join("attention_modules.rs"), list).expect("writing attention_modules.rs");
}
