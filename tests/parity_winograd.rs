//! The U-Net and VAE parity checks again with every 3x3 convolution computed by Winograd's
//! F(2x2, 3x3) (the tiny models' latents are too small to reach it by default), and with
//! none of them (the direct kernel alone). A binary of its own: the switch is process-wide.

mod common;
use common::models::{unet, vae};

#[test]
fn unet_and_vae_match_diffusers_with_winograd_everywhere_then_nowhere() {
    for min_tiles in [0, usize::MAX] {
        sdgen::kernels::set_winograd_min_tiles(min_tiles);
        for model in ["tiny", "tiny2"] {
            unet(model);
            vae(model);
        }
    }
}
