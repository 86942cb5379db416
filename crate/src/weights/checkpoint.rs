//! A checkpoint: one safetensors file (the original upload) or the Hugging Face sharded layout
//! (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`), read by original tensor
//! name. Tensors of a quantized checkpoint are found under their packed names (see `quant`), and a
//! tensor too large for one shard is stored as row slices `NAME.rows.START-END` in consecutive
//! shards, which are read as one tensor. No file I/O here.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use burn::tensor::{Bytes, Device, Tensor, TensorData};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::names::{OPTIONAL_TENSORS, TensorSpec};
use super::shard::{RangeFetch, Shard};
use super::values::{Half, Value, convert_par, convert_transposed_into, float_bytes, narrow_into, widen, widen_into, zeroed};
use crate::error::{Error, Result};
use crate::quant::{PackedMatrix, QuantSpec, Recipe, packed_names};

/// The marker of a row slice of a tensor split across shards: `NAME.rows.START-END`.
pub const ROWS_MARK: &str = ".rows.";

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// `model.safetensors.index.json`: which file holds which tensor, and (written by dsocr) each
/// shard's size and sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    #[serde(default)]
    pub metadata: IndexMetadata,
    pub weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IndexMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<u64>,
    /// File name → its size and sha256 (absent in indexes written by other tools).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shards: BTreeMap<String, ShardMeta>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub size: u64,
    pub sha256: String,
}

impl ShardIndex {
    pub fn parse(text: &str) -> Result<Self> {
        let index: Self = serde_json::from_str(text).map_err(|e| Error::Shard { file: INDEX_FILE.into(), message: e.to_string() })?;
        if index.weight_map.is_empty() {
            return Err(Error::Shard { file: INDEX_FILE.into(), message: "weight_map is empty".into() });
        }
        for file in index.files() {
            // Files are names next to the index, never paths.
            if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
                return Err(Error::Shard { file: INDEX_FILE.into(), message: format!("shard name {file:?} is not a plain file name") });
            }
        }
        Ok(index)
    }

    /// The shard files, in name order.
    pub fn files(&self) -> Vec<String> {
        let mut files: Vec<String> = self.weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        files
    }

    /// Checks a shard's bytes against the size and sha256 the index records for it (if any).
    pub fn verify(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let Some(meta) = self.metadata.shards.get(file) else { return Ok(()) };
        if bytes.len() as u64 != meta.size {
            return Err(Error::Shard { file: file.into(), message: format!("is {} bytes, the index says {}", bytes.len(), meta.size) });
        }
        let digest = sha256_hex(bytes);
        if !digest.eq_ignore_ascii_case(&meta.sha256) {
            return Err(Error::Shard { file: file.into(), message: format!("sha256 is {digest}, the index says {}", meta.sha256) });
        }
        Ok(())
    }
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A tensor as the model sees it: one stored tensor, or consecutive row slices of one.
struct Logical {
    dtype: Dtype,
    shape: Vec<usize>,
    parts: Vec<Part>,
}

struct Part {
    file: usize,
    stored: String,
    rows: Range<usize>,
}

pub struct Checkpoint<'a> {
    files: Vec<(String, Shard<'a>)>,
    tensors: HashMap<String, Logical>,
    data_len: usize,
}

impl<'a> Checkpoint<'a> {
    /// A single safetensors file held in memory.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        Self::from_shards(vec![(String::new(), Shard::parse(bytes)?)])
    }

    /// See [`Shard::with_release`] (single-file checkpoints; shards take theirs before
    /// [`Checkpoint::from_shards`]).
    pub fn with_release(mut self, release: Box<dyn Fn(usize, usize) + 'a>) -> Self {
        if self.files.len() == 1 {
            let (name, shard) = self.files.pop().expect("one file");
            self.files.push((name, shard.with_release(release)));
        }
        self
    }

    /// A single file read through `fetch` (see [`Shard::open`]).
    pub async fn open(fetch: Box<dyn RangeFetch>, window_bytes: usize) -> Result<Checkpoint<'static>> {
        Checkpoint::from_shards(vec![(String::new(), Shard::open(fetch, window_bytes).await?)])
    }

    /// Named files (shards) read as one checkpoint; with an index, every tensor it lists must be in
    /// the file it names. Row slices (`NAME.rows.START-END`) are joined into `NAME`.
    pub fn from_shards(files: Vec<(String, Shard<'a>)>) -> Result<Self> {
        Self::build(files, None)
    }

    /// [`Checkpoint::from_shards`], checked against `index`.
    pub fn from_index(files: Vec<(String, Shard<'a>)>, index: &ShardIndex) -> Result<Self> {
        Self::build(files, Some(index))
    }

    fn build(files: Vec<(String, Shard<'a>)>, index: Option<&ShardIndex>) -> Result<Self> {
        let mut pieces: BTreeMap<String, Vec<(usize, Part, Dtype, Vec<usize>)>> = BTreeMap::new();
        let mut data_len = 0;
        let shard_error = |file: &str, message: String| Error::Shard { file: file.into(), message };
        for (f, (file, shard)) in files.iter().enumerate() {
            data_len += shard.data_len();
            for stored in shard.names() {
                let info = shard.info(&stored)?;
                if let Some(index) = index {
                    if index.weight_map.get(&stored) != Some(file) {
                        return Err(shard_error(file, format!("holds `{stored}`, which the index does not place there")));
                    }
                }
                let (logical, rows) = match split_rows_name(&stored) {
                    Some((logical, rows)) => (logical.to_string(), rows),
                    None => (stored.clone(), 0..info.shape.first().copied().unwrap_or(1)),
                };
                let part = Part { file: f, stored: stored.clone(), rows: rows.clone() };
                pieces.entry(logical).or_default().push((rows.start, part, info.dtype, info.shape.clone()));
            }
        }
        if let Some(index) = index {
            for (stored, file) in &index.weight_map {
                if !files.iter().any(|(name, shard)| name == file && shard.info(stored).is_ok()) {
                    return Err(shard_error(file, format!("lacks `{stored}`, which the index places there")));
                }
            }
        }
        let mut tensors = HashMap::new();
        for (name, mut parts) in pieces {
            parts.sort_by_key(|p| p.0);
            let (_, first, dtype, shape) = &parts[0];
            let (dtype, mut shape) = (*dtype, shape.clone());
            let file_of = |p: &Part| files[p.file].0.clone();
            if parts.len() > 1 || split_rows_name(&first.stored).is_some() {
                // Row slices must tile 0..rows with one dtype and the same trailing dimensions.
                let mut next = 0;
                for (_, part, d, s) in &parts {
                    let ok = *d == dtype && s.len() == shape.len() && s[1..] == shape[1..] && part.rows.start == next && s[0] == part.rows.len();
                    if !ok {
                        return Err(shard_error(&file_of(part), format!("`{}` does not continue `{name}` (rows from {next}, {dtype:?} {:?})", part.stored, &shape[1..])));
                    }
                    next = part.rows.end;
                }
                shape[0] = next;
            }
            tensors.insert(name, Logical { dtype, shape, parts: parts.into_iter().map(|p| p.1).collect() });
        }
        Ok(Self { files, tensors, data_len })
    }

    /// Names of all tensors (row slices joined), unordered.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes of tensor data in all files (what loading reads, at most).
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// Bytes per stored element of `name` (1 for packed int4 bytes).
    pub fn element_bytes(&self, name: &str) -> Result<usize> {
        Ok(self.logical(name)?.dtype.bitsize().div_ceil(8))
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.logical(name)?.shape.clone())
    }

    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.logical(name)?.dtype)
    }

    /// Whether weight `name` is stored quantized (its packed values are present instead of it).
    pub fn is_packed(&self, name: &str) -> bool {
        !self.contains(name) && packed_names(name).is_some_and(|(values, _)| self.contains(&values))
    }

    /// Checks that every expected tensor is present with its shape — a weight the recipe quantizes
    /// may instead be present as packed values and scales of the shapes `recipe` implies — and
    /// returns the names in the file that the model does not know (besides [`OPTIONAL_TENSORS`]).
    pub fn check(&self, expected: &[TensorSpec], recipe: Option<&Recipe>) -> Result<Vec<String>> {
        let mut known: std::collections::HashSet<String> = expected.iter().map(|s| s.name.clone()).collect();
        for spec in expected {
            if self.is_packed(&spec.name) {
                let (values, scales) = packed_names(&spec.name).expect("is_packed checked the name");
                let quant = Recipe::stored_spec(recipe, &spec.name)?;
                let ([rows, cols], true) = (<[usize; 2]>::try_from(spec.shape.clone()).unwrap_or([0, 0]), spec.shape.len() == 2) else {
                    return Err(Error::Unsupported(format!("`{}` is not a matrix and cannot be quantized", spec.name)));
                };
                self.check_one(&values, quant.value_dtype(), &[rows, quant.row_bytes(cols)])?;
                self.check_one(&scales, quant.scale_dtype(), &[rows, quant.groups(cols)])?;
                known.insert(values);
                known.insert(scales);
            } else {
                let found = self.shape(&spec.name).map_err(|e| self.in_file(&spec.name, e))?;
                if found != spec.shape {
                    return Err(self.in_file(&spec.name, Error::ShapeMismatch { name: spec.name.clone(), expected: spec.shape.clone(), found }));
                }
            }
        }
        let mut unknown: Vec<String> =
            self.names().into_iter().filter(|n| !known.contains(n.as_str()) && !OPTIONAL_TENSORS.contains(&n.as_str())).collect();
        unknown.sort();
        Ok(unknown)
    }

    fn check_one(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let found = self.logical(name)?;
        if found.shape != shape {
            return Err(self.in_file(name, Error::ShapeMismatch { name: name.into(), expected: shape.to_vec(), found: found.shape.clone() }));
        }
        if found.dtype != dtype {
            return Err(self.in_file(name, Error::UnsupportedDtype { name: name.into(), dtype: format!("{:?} (expected {dtype:?})", found.dtype) }));
        }
        Ok(())
    }

    /// `error` about tensor `name`, naming the file that holds it (sharded checkpoints).
    fn in_file(&self, name: &str, error: Error) -> Error {
        match self.tensors.get(name).and_then(|t| t.parts.first()) {
            Some(part) => Error::in_file(&self.files[part.file].0, error),
            // Not there at all: a single file is still the one to blame; of several, none is.
            None if self.files.len() == 1 => Error::in_file(&self.files[0].0, error),
            None => error,
        }
    }

    /// The values of a floating-point tensor as f32 (bf16 and f16 widen exactly), after checking
    /// that its shape is `shape`.
    pub async fn f32_values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let rows = shape.first().copied().unwrap_or(1);
        self.f32_rows(name, shape, 0..rows).await
    }

    /// Rows `rows` (along the first axis) of a floating-point tensor as f32, after checking that its
    /// shape is `shape`. Reads only those rows' bytes.
    pub async fn f32_rows(&self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Vec<f32>> {
        self.rows_as(name, shape, rows, widen_into).await
    }

    /// Rows `rows` of the float `(rows, cols)` matrix `name` as f32 in their transpose `(cols,
    /// rows.len())` (burn's `[in, out]` for a Linear), widened and transposed in one pass.
    pub async fn f32_rows_transposed(&self, name: &str, shape: [usize; 2], rows: Range<usize>) -> Result<Vec<f32>> {
        self.rows_transposed_as(name, shape, rows, widen_into).await
    }

    /// [`Checkpoint::f32_rows`] (`transposed`: [`Checkpoint::f32_rows_transposed`]) as tensor data
    /// in `half`'s float type, or f32 when `None`: a half type stored as it is copied, never widened.
    pub(crate) async fn float_data(&self, name: &str, shape: &[usize], rows: Range<usize>, transposed: bool, half: Option<Half>) -> Result<TensorData> {
        let mut out_shape = shape.to_vec();
        out_shape[0] = rows.len();
        if transposed {
            out_shape.reverse();
        }
        let matrix = <[usize; 2]>::try_from(shape).ok().filter(|_| transposed);
        let Some(half) = half else {
            let values = match matrix {
                Some(shape) => self.f32_rows_transposed(name, shape, rows).await?,
                None => self.f32_rows(name, shape, rows).await?,
            };
            return Ok(TensorData::new(values, out_shape));
        };
        let narrow = move |dtype: Dtype, bytes: &[u8], out: &mut [u16]| narrow_into(dtype, half, bytes, out);
        let bits = match matrix {
            Some(shape) => self.rows_transposed_as(name, shape, rows, narrow).await?,
            None => self.rows_as(name, shape, rows, narrow).await?,
        };
        Ok(TensorData::from_bytes(Bytes::from_elems(bits), out_shape, half.dtype()))
    }

    /// Rows `rows` of float tensor `name` (shape checked) converted by `convert`, on all cores.
    async fn rows_as<T: Value>(&self, name: &str, shape: &[usize], rows: Range<usize>, convert: impl Fn(Dtype, &[u8], &mut [T]) + Sync) -> Result<Vec<T>> {
        let (dtype, size) = self.float_dtype(name, shape)?;
        let mut out = zeroed(rows.len() * shape.iter().skip(1).product::<usize>());
        let mut at = 0;
        self.each_part(name, rows, |bytes| {
            let n = bytes.len() / size;
            convert_par(dtype, bytes, &mut out[at..at + n], |bytes, out| convert(dtype, bytes, out));
            at += n;
        })
        .await?;
        Ok(out)
    }

    /// Rows `rows` of the float `(rows, cols)` matrix `name` converted by `convert` and transposed
    /// to `(cols, rows.len())` in one pass.
    async fn rows_transposed_as<T: Value>(&self, name: &str, shape: [usize; 2], rows: Range<usize>, convert: impl Fn(Dtype, &[u8], &mut [T]) + Sync) -> Result<Vec<T>> {
        let (dtype, size) = self.float_dtype(name, &shape)?;
        let (n, cols) = (rows.len(), shape[1]);
        let mut out = zeroed(n * cols);
        let mut at = 0;
        self.each_part(name, rows, |bytes| {
            convert_transposed_into(dtype, bytes, cols, &mut out, n, at, |bytes, out| convert(dtype, bytes, out));
            at += bytes.len() / (cols * size).max(1);
        })
        .await?;
        Ok(out)
    }

    /// Rows `rows` of the float `(rows, cols)` matrix `name` quantized by `spec` as they are read,
    /// straight from the stored bytes (one row of f32 per thread in memory): the same numbers as
    /// [`PackedMatrix::quantize`] of [`Checkpoint::f32_rows`].
    pub async fn quantized_rows(&self, name: &str, shape: [usize; 2], rows: Range<usize>, spec: QuantSpec) -> Result<PackedMatrix> {
        let (dtype, size) = self.float_dtype(name, &shape)?;
        let row_bytes = shape[1] * size;
        let mut parts = Vec::with_capacity(1);
        self.each_part(name, rows, |bytes| {
            let part_rows = bytes.len() / row_bytes.max(1);
            parts.push(PackedMatrix::quantize_rows(part_rows, shape[1], spec, |r, out| widen_into(dtype, &bytes[r * row_bytes..(r + 1) * row_bytes], out)));
        })
        .await?;
        Ok(PackedMatrix::concat_rows(parts, shape[1], spec))
    }

    /// `name`'s dtype and bytes per value, after checking that it is a float one and that its shape
    /// is `shape`.
    fn float_dtype(&self, name: &str, shape: &[usize]) -> Result<(Dtype, usize)> {
        let logical = self.logical(name)?;
        if logical.shape != shape {
            return Err(self.in_file(name, Error::ShapeMismatch { name: name.into(), expected: shape.to_vec(), found: logical.shape.clone() }));
        }
        match float_bytes(logical.dtype) {
            Some(size) => Ok((logical.dtype, size)),
            None => Err(self.in_file(name, Error::UnsupportedDtype { name: name.into(), dtype: format!("{:?}", logical.dtype) })),
        }
    }

    /// The stored bytes of rows `rows` of `name`, whatever its dtype.
    pub async fn raw_rows(&self, name: &str, rows: Range<usize>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.each_part(name, rows, |bytes| out.extend_from_slice(bytes)).await?;
        Ok(out)
    }

    /// Rows `rows` of quantized weight `name` (`(rows, cols)` in the original checkpoint), from its
    /// packed values and scales, as `spec` (the checkpoint's recipe) lays them out.
    pub async fn packed_rows(&self, name: &str, spec: QuantSpec, cols: usize, rows: Range<usize>) -> Result<PackedMatrix> {
        let (values, scales) = packed_names(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        let data = self.raw_rows(&values, rows.clone()).await?;
        let scale_dtype = self.dtype(&scales)?;
        let mut widened = Vec::new();
        self.each_part(&scales, rows.clone(), |bytes| widened.extend(widen(scale_dtype, bytes))).await?;
        PackedMatrix::from_parts(spec, rows.len(), cols, data, widened).map_err(|e| self.in_file(&values, e))
    }

    /// Loads `name` as a float tensor of rank `D` on `device` (the device's float dtype), checking its shape.
    pub async fn tensor<const D: usize>(&self, name: &str, shape: [usize; D], device: &Device) -> Result<Tensor<D>> {
        let values = self.f32_values(name, &shape).await?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    fn logical(&self, name: &str) -> Result<&Logical> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor { name: name.into() })
    }

    /// Hands `f` the stored bytes of rows `rows` of `name`, part by part in row order.
    async fn each_part(&self, name: &str, rows: Range<usize>, mut f: impl FnMut(&[u8])) -> Result<()> {
        let logical = self.logical(name)?;
        let total = logical.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total {
            return Err(Error::InvalidArgument(format!("rows {rows:?} of `{name}` with {total} rows")));
        }
        for part in &logical.parts {
            let (from, to) = (rows.start.max(part.rows.start), rows.end.min(part.rows.end));
            if from >= to {
                continue;
            }
            let (file, shard) = &self.files[part.file];
            let local = from - part.rows.start..to - part.rows.start;
            shard.rows(&part.stored, local, &mut f).await.map_err(|e| Error::in_file(file, e))?;
        }
        Ok(())
    }
}

/// `NAME.rows.START-END` → (`NAME`, `START..END`).
fn split_rows_name(stored: &str) -> Option<(&str, Range<usize>)> {
    let at = stored.rfind(ROWS_MARK)?;
    let (start, end) = stored[at + ROWS_MARK.len()..].split_once('-')?;
    let (start, end) = (start.parse().ok()?, end.parse().ok()?);
    (start < end).then_some((&stored[..at], start..end))
}

/// The stored name of rows `rows` of `name` when it is split across shards.
pub fn rows_name(name: &str, rows: &Range<usize>) -> String {
    format!("{name}{ROWS_MARK}{}-{}", rows.start, rows.end)
}
