//! DeepEncoder parity with the official code, stage by stage (CPU backend, f32): SAM neck, both
//! compressor convs, CLIP, projector and the assembled image sequence, for both tiny checkpoints, every
//! mode and every recorded image. Criterion: max |ours − ref| ≤ 1e-4 · max |ref| per tensor.

use burn::tensor::Device;
use dsocr::Config;
use dsocr::model::{ViewFeatures, VisionEncoder};
use dsocr::weights::{Checkpoint, Loader};
use dsocr_tests::{Array, CaseIndex, Fixture, Tolerance, assert_close, checkpoint_dir, load_views, read_fixture, to_array, to_tensor};

const TOLERANCE: Tolerance = Tolerance::RelativeToMax(1e-4);

fn load_encoder(checkpoint: &str, device: &Device) -> VisionEncoder {
    let dir = checkpoint_dir(checkpoint);
    let config = Config::from_json(std::str::from_utf8(&read_fixture(&dir.join("config.json"))).unwrap()).unwrap();
    let bytes = read_fixture(&dir.join("model.safetensors"));
    let weights = Checkpoint::parse(&bytes).unwrap();
    VisionEncoder::load(&config, &Loader::new(&weights, device)).unwrap()
}

fn check_stages(label: &str, view: &str, ours: &ViewFeatures, fixture: &Fixture) {
    let stages: [(&str, Array); 5] = [
        ("sam", to_array(ours.sam.neck.clone())),
        ("compressor_1", to_array(ours.sam.compressor_1.clone())),
        ("compressor", to_array(ours.sam.compressed.clone())),
        ("clip", to_array(ours.clip.clone())),
        ("projector", to_array(ours.projected.clone())),
    ];
    for (stage, actual) in stages {
        let name = format!("{view}.{stage}");
        let c = assert_close(&format!("{label} {name}"), &actual, &fixture.f32(&name), TOLERANCE);
        eprintln!("{label} {name}: {c}");
    }
}

fn parity(checkpoint: &str, mode: &str) {
    let device = Device::flex();
    let encoder = load_encoder(checkpoint, &device);
    let index = CaseIndex::load(checkpoint);
    let cases: Vec<_> = index.cases.iter().filter(|c| c.mode == mode).collect();
    assert_eq!(cases.len(), 3, "three images per mode");
    for case in cases {
        let label = format!("{checkpoint} {} {mode}", case.image);
        let fixture = case.fixture(checkpoint);
        let views = load_views(&case.image, mode);
        let global = encoder.encode_views(to_tensor(&views.global, &device));
        check_stages(&label, "global", &global, &fixture);
        let local = views.tiles.as_ref().map(|(pixels, grid)| {
            let features = encoder.encode_views(to_tensor(pixels, &device));
            check_stages(&label, "local", &features, &fixture);
            (features.projected, *grid)
        });
        assert_eq!(local.is_some(), fixture.contains("local.sam"), "{label}: tiling differs from the reference");
        let sequence = to_array(encoder.assemble(global.projected, local));
        assert_eq!(sequence.shape[0], case.image_tokens, "{label}: one vector per <image> placeholder");
        assert_close(&format!("{label} image_embeds"), &sequence, &fixture.f32("image_embeds"), TOLERANCE);
    }
}

macro_rules! parity_tests {
    ($($name:ident: $checkpoint:literal, $mode:literal;)*) => {$(
        #[test]
        fn $name() {
            parity($checkpoint, $mode);
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
    let encoder = load_encoder("tiny-b", &device);
    let views = load_views("photo", "gundam");
    let tiles = views.tiles.as_ref().map(|(p, g)| (to_tensor(p, &device), *g));
    let sequence = to_array(encoder.embed_image(to_tensor(&views.global, &device), tiles));
    let case = CaseIndex::load("tiny-b").cases.into_iter().find(|c| c.image == "photo" && c.mode == "gundam").unwrap();
    assert_close("tiny-b photo gundam", &sequence, &case.fixture("tiny-b").f32("image_embeds"), TOLERANCE);
}
