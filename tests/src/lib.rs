//! Fixture harness: loads what `tests/reference/generate.py` recorded with the official model code and
//! compares our outputs with it, reporting the worst element by index when they disagree.

pub mod parity;
pub mod quant;

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

/// `tests/fixtures/`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The tiny random-weight checkpoints the generator writes, in the original hub layout.
pub const TINY_CHECKPOINTS: [&str; 2] = ["tiny-a", "tiny-b"];

/// The tiny DeepSeek-OCR-2 checkpoints (`tests/reference/generate_v2.py`), as paths under the fixtures.
pub const TINY_V2_CHECKPOINTS: [&str; 2] = ["ocr2/tiny-v2a", "ocr2/tiny-v2b"];

pub fn checkpoint_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// Reads a file under the fixtures, with a message that says how to regenerate it if it is absent.
pub fn read_fixture(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!("cannot read fixture {}: {e} (regenerate with tests/reference/generate.py)", path.display())
    })
}

/// A dense row-major array read from a fixture (or produced by the code under test).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Array {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} does not match {} values", data.len());
        Self { shape, data }
    }

    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    }

    /// Multi-dimensional index of flat position `flat`.
    pub fn unravel(&self, mut flat: usize) -> Vec<usize> {
        let mut index = vec![0; self.shape.len()];
        for (axis, &dim) in self.shape.iter().enumerate().rev() {
            index[axis] = flat % dim.max(1);
            flat /= dim.max(1);
        }
        index
    }
}

/// One safetensors file of fixture tensors.
pub struct Fixture {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_path_buf();
        let bytes = read_fixture(&path);
        SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: not a safetensors file: {e}", path.display()));
        Self { path, bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors().names().into_iter().map(str::to_owned).collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }

    /// A floating-point tensor as f32 (bf16/f16 widened exactly, by the crate's own checkpoint reader).
    pub fn f32(&self, name: &str) -> Array {
        let reader = dsocr::weights::Checkpoint::parse(&self.bytes).expect("validated in open");
        let fail = |e: dsocr::Error| -> ! { panic!("{}: {e} (has {:?})", self.path.display(), self.names()) };
        let shape = reader.shape(name).unwrap_or_else(|e| fail(e));
        let data = pollster::block_on(reader.f32_values(name, &shape)).unwrap_or_else(|e| fail(e));
        Array::new(shape, data)
    }

    /// An integer tensor (token ids, grids) as i64.
    pub fn i64(&self, name: &str) -> Vec<i64> {
        let tensors = self.tensors();
        let view = tensors.tensor(name).unwrap_or_else(|_| panic!("{}: no tensor {name:?}", self.path.display()));
        let b = view.data();
        match view.dtype() {
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            other => panic!("{}: tensor {name:?} is {other:?}, not an integer type", self.path.display()),
        }
    }
}

/// How close `actual` must be to the reference.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// `max |a − r| ≤ factor · max |r|` over the whole tensor: the parity criterion for stage outputs.
    RelativeToMax(f32),
    /// Per element: `|a − r| ≤ abs + rel · |r|`.
    Elementwise { abs: f32, rel: f32 },
}

/// The outcome of comparing two arrays of the same shape.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub max_abs_err: f32,
    /// Largest `|a − r| / |r|` over elements with `|r| > 0`.
    pub max_rel_err: f32,
    pub reference_max_abs: f32,
    /// The element that most exceeds the tolerance (or has the largest error when all pass).
    pub worst_index: Vec<usize>,
    pub worst_actual: f32,
    pub worst_expected: f32,
    pub passed: bool,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max abs err {:.3e}, max rel err {:.3e}, max |ref| {:.3e}; worst at {:?}: got {} expected {}",
            self.max_abs_err, self.max_rel_err, self.reference_max_abs, self.worst_index, self.worst_actual,
            self.worst_expected
        )
    }
}

/// Compares `actual` with `expected`. Shapes must match exactly; a NaN anywhere fails.
pub fn compare(actual: &Array, expected: &Array, tolerance: Tolerance) -> Result<Comparison, String> {
    if actual.shape != expected.shape {
        return Err(format!("shape {:?} differs from the reference's {:?}", actual.shape, expected.shape));
    }
    let reference_max_abs = expected.max_abs();
    let mut max_abs_err = 0.0f32;
    let mut max_rel_err = 0.0f32;
    // The worst element is the one with the largest excess over its allowed error.
    let (mut worst, mut worst_excess) = (0usize, f32::NEG_INFINITY);
    for (i, (&a, &r)) in actual.data.iter().zip(&expected.data).enumerate() {
        let err = (a - r).abs();
        let err = if err.is_nan() { f32::INFINITY } else { err };
        max_abs_err = max_abs_err.max(err);
        if r != 0.0 {
            max_rel_err = max_rel_err.max(err / r.abs());
        }
        let allowed = match tolerance {
            Tolerance::RelativeToMax(factor) => factor * reference_max_abs,
            Tolerance::Elementwise { abs, rel } => abs + rel * r.abs(),
        };
        if err - allowed > worst_excess {
            worst_excess = err - allowed;
            worst = i;
        }
    }
    let worst_index = expected.unravel(worst);
    Ok(Comparison {
        max_abs_err,
        max_rel_err,
        reference_max_abs,
        worst_index,
        worst_actual: actual.data.get(worst).copied().unwrap_or(f32::NAN),
        worst_expected: expected.data.get(worst).copied().unwrap_or(f32::NAN),
        passed: worst_excess <= 0.0 || expected.data.is_empty(),
    })
}

/// Panics with the worst element's index and values unless `actual` matches `expected`.
#[track_caller]
pub fn assert_close(label: &str, actual: &Array, expected: &Array, tolerance: Tolerance) -> Comparison {
    match compare(actual, expected, tolerance) {
        Err(msg) => panic!("{label}: {msg}"),
        Ok(c) if !c.passed => panic!("{label}: outside {tolerance:?}: {c}"),
        Ok(c) => c,
    }
}

/// One recorded run of the official model: an image, a mode, a prompt (`<config>/cases/index.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub image: String,
    pub mode: String,
    pub prompt: String,
    /// Tiles across and down (the reference's `images_spatial_crop`); `[1, 1]` when not tiled.
    pub grid: [usize; 2],
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub greedy_tokens: Vec<u32>,
    pub min_greedy_gap: f32,
    pub has_logits_columns: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CaseIndex {
    pub config: String,
    pub greedy_tokens: usize,
    pub logit_columns: Vec<u32>,
    pub cases: Vec<Case>,
}

impl CaseIndex {
    pub fn load(checkpoint: &str) -> Self {
        let path = checkpoint_dir(checkpoint).join("cases").join("index.json");
        serde_json::from_slice(&read_fixture(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

impl Case {
    /// The tensors recorded for this case in `checkpoint`.
    pub fn fixture(&self, checkpoint: &str) -> Fixture {
        // Images under a folder (`extra/square`) are recorded as `extra-square-<mode>`.
        Fixture::open(checkpoint_dir(checkpoint).join("cases").join(format!("{}-{}.safetensors", self.image.replace('/', "-"), self.mode)))
    }
}

/// Reads a burn tensor back to the host as an [`Array`].
pub fn to_array<const D: usize>(tensor: burn::tensor::Tensor<D>) -> Array {
    let shape = tensor.dims().to_vec();
    let data = tensor.into_data();
    let values = data.convert::<f32>();
    Array::new(shape, values.as_slice::<f32>().expect("f32 data").to_vec())
}

/// Uploads an [`Array`] to `device`.
pub fn to_tensor<const D: usize>(array: &Array, device: &burn::tensor::Device) -> burn::tensor::Tensor<D> {
    let shape: [usize; D] = array.shape.clone().try_into().expect("rank mismatch");
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(array.data.clone(), shape), device)
}

/// The views `infer` made of one image in one mode, as the model's pixel input.
pub struct Views {
    /// `(1, 3, S, S)`.
    pub global: Array,
    /// `(across·down, 3, T, T)` in row-major tile order, with the grid `[across, down]`.
    pub tiles: Option<(Array, [usize; 2])>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessCase {
    pub image: String,
    pub mode: String,
    pub original_size: [usize; 2],
    pub grid: [usize; 2],
    pub views: Vec<String>,
}

pub fn preprocess_index() -> std::collections::BTreeMap<String, PreprocessCase> {
    let path = fixtures_dir().join("preprocess/index.json");
    serde_json::from_slice(&read_fixture(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One view the reference made, recorded as its size and the sha256 of its uint8 RGB pixels.
#[derive(Debug, Clone, Deserialize)]
pub struct ViewHash {
    pub size: [u32; 2],
    pub sha256: String,
}

/// The views of one image in one mode, recorded as hashes (`preprocess/extra.json`, `ocr2/preprocess.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct HashedCase {
    pub image: String,
    pub mode: String,
    pub grid: [usize; 2],
    pub image_tokens: usize,
    pub views: Vec<ViewHash>,
}

/// Reads a file of [`HashedCase`]s keyed `image/mode`.
pub fn hashed_cases(path: &Path) -> std::collections::BTreeMap<String, HashedCase> {
    serde_json::from_slice(&read_fixture(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Our views (global first, then the tiles in row-major order) equal the recorded ones: the grid,
/// then each view's size and pixels.
pub fn assert_views_match(key: &str, views: &dsocr::image::Views, case: &HashedCase) {
    use sha2::{Digest, Sha256};
    assert_eq!(views.grid, case.grid, "{key}: tile grid");
    let ours: Vec<&image::RgbImage> = std::iter::once(&views.global).chain(&views.tiles).collect();
    assert_eq!(ours.len(), case.views.len(), "{key}: views (global first, then tiles)");
    for (k, (view, reference)) in ours.iter().zip(&case.views).enumerate() {
        assert_eq!([view.width(), view.height()], reference.size, "{key} view {k}: size");
        let hex: String = Sha256::digest(view.as_raw()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, reference.sha256, "{key} view {k}: pixels differ from the reference");
    }
}

/// A PNG view normalised with bf16 rounding, as `infer` feeds it: `(1, 3, H, W)`.
fn normalise_png(path: &Path) -> Array {
    let img = image::load_from_memory(&read_fixture(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    let (values, shape) = dsocr::image::normalize(&[&img], true);
    Array::new(shape.to_vec(), values)
}

/// Loads the recorded views of `image` in `mode` (from the PNG fixtures), normalised like the reference.
pub fn load_views(image: &str, mode: &str) -> Views {
    let index = preprocess_index();
    let case = index.get(&format!("{image}/{mode}")).unwrap_or_else(|| panic!("no preprocess fixture {image}/{mode}"));
    let dir = fixtures_dir().join("preprocess").join(image).join(mode);
    let global = normalise_png(&dir.join("global.png"));
    let tiles = if case.views.len() > 1 {
        let parts: Vec<Array> = case.views[1..].iter().map(|v| normalise_png(&dir.join(format!("{v}.png")))).collect();
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.len();
        let data = parts.into_iter().flat_map(|a| a.data).collect();
        Some((Array::new(shape, data), case.grid))
    } else {
        None
    };
    Views { global, tiles }
}

/// The views of `image` in `mode` for a fixture checkpoint: DeepSeek-OCR's from the recorded PNGs;
/// DeepSeek-OCR-2's (recorded as hashes, checked by `parity_preprocess`) made by dsocr's own
/// preprocessing from the source image.
pub fn views_for(checkpoint: &str, image: &str, mode: &str) -> Views {
    if !checkpoint.starts_with("ocr2/") {
        return load_views(image, mode);
    }
    let bytes = read_fixture(&fixtures_dir().join("images").join(format!("{image}.png")));
    let source = dsocr::image::decode(&bytes, &dsocr::image::DecodeLimits::default()).unwrap();
    let mode: dsocr::Mode = mode.parse().unwrap();
    let geometry = mode.geometry(dsocr::config::ModelVersion::Ocr2).unwrap();
    let views = dsocr::image::make_views_for(&source, &geometry, &dsocr::image::PreprocessOptions::default()).unwrap();
    let array = |images: &[&image::RgbImage]| {
        let (values, shape) = dsocr::image::normalize(images, true);
        Array::new(shape.to_vec(), values)
    };
    let tiles = (!views.tiles.is_empty()).then(|| (array(&views.tiles.iter().collect::<Vec<_>>()), views.grid));
    Views { global: array(&[&views.global]), tiles }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(shape: &[usize], data: &[f32]) -> Array {
        Array::new(shape.to_vec(), data.to_vec())
    }

    #[test]
    fn equal_arrays_pass_with_zero_error() {
        let a = arr(&[2, 2], &[1.0, -2.0, 3.0, 4.0]);
        let c = compare(&a, &a, Tolerance::RelativeToMax(0.0)).unwrap();
        assert!(c.passed);
        assert_eq!(c.max_abs_err, 0.0);
    }

    #[test]
    fn reports_the_worst_element_by_index() {
        let expected = arr(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let actual = arr(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.5, 6.01]);
        let c = compare(&actual, &expected, Tolerance::RelativeToMax(1e-3)).unwrap();
        assert!(!c.passed);
        assert_eq!(c.worst_index, vec![1, 1]);
        assert_eq!((c.worst_actual, c.worst_expected), (5.5, 5.0));
        assert!((c.max_abs_err - 0.5).abs() < 1e-6);
        assert!((c.max_rel_err - 0.1).abs() < 1e-6);
    }

    #[test]
    fn elementwise_tolerance_scales_with_each_value() {
        let expected = arr(&[3], &[1000.0, 1.0, 0.0]);
        let actual = arr(&[3], &[1000.5, 1.0, 0.0]);
        assert!(compare(&actual, &expected, Tolerance::Elementwise { abs: 0.0, rel: 1e-3 }).unwrap().passed);
        let actual = arr(&[3], &[1000.0, 1.5, 0.0]);
        let c = compare(&actual, &expected, Tolerance::Elementwise { abs: 0.0, rel: 1e-3 }).unwrap();
        assert!(!c.passed);
        assert_eq!(c.worst_index, vec![1]);
    }

    #[test]
    fn nan_fails_and_shape_mismatch_is_an_error() {
        let expected = arr(&[2], &[1.0, 2.0]);
        let c = compare(&arr(&[2], &[1.0, f32::NAN]), &expected, Tolerance::RelativeToMax(1.0)).unwrap();
        assert!(!c.passed);
        assert_eq!(c.worst_index, vec![1]);
        assert!(compare(&arr(&[1, 2], &[1.0, 2.0]), &expected, Tolerance::RelativeToMax(1.0)).is_err());
    }

    #[test]
    #[should_panic(expected = "worst at [0, 1]")]
    fn assert_close_panics_with_the_index() {
        let expected = arr(&[1, 2], &[1.0, 2.0]);
        assert_close("stage", &arr(&[1, 2], &[1.0, 3.0]), &expected, Tolerance::RelativeToMax(1e-4));
    }
}

/// The native wgpu device (Vulkan/Metal/DX12) and its largest binding in bytes, once per test
/// process; `f16` configures half precision first. `None` (after saying why) when there is no
/// adapter or it lacks f16, unless `DSOCR_REQUIRE_WGPU` is set: then that is a failure.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(f16: bool) -> Option<(burn::tensor::Device, usize)> {
    use burn::tensor::{DType, Device, FloatDType};
    static DEVICE: std::sync::OnceLock<Result<(Device, usize), String>> = std::sync::OnceLock::new();
    let found = DEVICE.get_or_init(|| {
        let (mut device, setup) = pollster::block_on(Device::wgpu_options().init_with_setup_async()).map_err(|e| format!("no wgpu adapter: {e:?}"))?;
        let max = dsocr::engine::wgpu_max_tensor_bytes(&setup);
        eprintln!("wgpu adapter: {:?} ({:?}), largest binding {} MiB", setup.adapter.get_info().name, setup.backend, max >> 20);
        if f16 {
            if !device.supports_dtype(DType::F16) {
                return Err("the wgpu adapter has no f16 support".into());
            }
            device.configure(FloatDType::F16).map_err(|e| format!("{e:?}"))?;
        }
        Ok((device, max))
    });
    match found {
        Ok(found) => Some(found.clone()),
        Err(why) if std::env::var_os("DSOCR_REQUIRE_WGPU").is_some() => panic!("{why} (DSOCR_REQUIRE_WGPU is set)"),
        Err(why) => {
            eprintln!("SKIPPED: {why}; install a Vulkan driver (Debian: mesa-vulkan-drivers) to run the GPU parity tests");
            None
        }
    }
}

/// Runs test `name` of the current test binary again in a child process with `env` set, and
/// asserts it passed there. For checks that need a fresh device: a device's float type is fixed
/// at its first tensor. Returns false in the child itself (where the caller should do the work).
pub fn in_child_process(name: &str, env: (&str, &str)) -> bool {
    if std::env::var(env.0).as_deref() == Ok(env.1) {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", name, "--nocapture"])
        .env(env.0, env.1)
        .output()
        .expect("run the test binary");
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{name} with {}={} failed:\n{log}", env.0, env.1);
    true
}
