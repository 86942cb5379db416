//! DeepEncoder parity with the official code, stage by stage (CPU backend, f32): SAM neck, both
//! compressor convs, CLIP, projector and the assembled image sequence, for both tiny checkpoints, every
//! mode and every recorded image. Criterion: max |ours − ref| ≤ 1e-4 · max |ref| per tensor.

use burn::tensor::Device;
use dsocr_tests::parity::{encoder_parity, load_model};
use dsocr_tests::{CaseIndex, Tolerance, assert_close, load_views, to_array, to_tensor};

const TOLERANCE: Tolerance = Tolerance::RelativeToMax(1e-4);

macro_rules! parity_tests {
    ($($name:ident: $checkpoint:literal, $mode:literal;)*) => {$(
        #[test]
        fn $name() {
            let model = load_model($checkpoint, &Device::flex(), usize::MAX);
            encoder_parity(&model, $checkpoint, $mode, TOLERANCE);
        }
    )*};
}

parity_tests! {
    parity_encoder_tiny_a_tiny: "tiny-a", "tiny";
    parity_encoder_tiny_a_small: "tiny-a", "small";
    parity_encoder_tiny_a_base: "tiny-a", "base";
    parity_encoder_tiny_a_large: "tiny-a", "large";
    parity_encoder_tiny_a_gundam: "tiny-a", "gundam";
    parity_encoder_tiny_b_tiny: "tiny-b", "tiny";
    parity_encoder_tiny_b_small: "tiny-b", "small";
    parity_encoder_tiny_b_base: "tiny-b", "base";
    parity_encoder_tiny_b_large: "tiny-b", "large";
    parity_encoder_tiny_b_gundam: "tiny-b", "gundam";
}

#[test]
fn parity_encoder_embed_image_equals_stagewise_assembly() {
    let device = Device::flex();
    let model = load_model("tiny-b", &device, usize::MAX);
    let views = load_views("photo", "gundam");
    let tiles = views.tiles.as_ref().map(|(p, g)| (to_tensor(p, &device), *g));
    let sequence = to_array(model.encoder.embed_image(to_tensor(&views.global, &device), tiles).unwrap());
    let case = CaseIndex::load("tiny-b").cases.into_iter().find(|c| c.image == "photo" && c.mode == "gundam").unwrap();
    assert_close("tiny-b photo gundam", &sequence, &case.fixture("tiny-b").f32("image_embeds"), TOLERANCE);
}
