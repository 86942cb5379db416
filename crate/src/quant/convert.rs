//! The converter behind `dsocr quantize`: a float checkpoint in, a quantized sharded checkpoint out,
//! one tensor at a time, quantized as it is read (one row of f32 per thread), so memory stays far
//! below the model's size.
//! Same input and recipe → same bytes and hashes.

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use safetensors::Dtype;

use super::recipe::{Recipe, packed_names};
use super::scheme::{PackedMatrix, ScaleDtype};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, ShardIndex, expected_tensors};
#[cfg(not(target_arch = "wasm32"))]
use crate::weights::{ShardWriter, write_atomic};

/// Small files copied from the source folder when present (config.json is rewritten).
pub const COPIED_FILES: [&str; 4] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"];

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    pub index: ShardIndex,
    /// Bytes of the shards.
    pub bytes: u64,
    pub quantized_tensors: usize,
    pub float_tensors: usize,
}

/// Where a conversion puts each tensor it has made (in checkpoint order): the native
/// [`ShardWriter`]'s files, or the browser's cache ([`crate::weights::ShardPacker`] and a JS store).
pub trait TensorSink {
    fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> impl std::future::Future<Output = Result<()>>;
}

#[cfg(not(target_arch = "wasm32"))]
impl TensorSink for ShardWriter {
    async fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Result<()> {
        ShardWriter::add(self, name, dtype, shape, bytes)
    }
}

/// Source bytes read at a time: a large matrix (the 129,280-row embedding) is read and quantized
/// in blocks of rows, so a ranged source (the browser) never holds it whole in float.
const READ_BYTES: usize = 16 << 20;

/// Converts checkpoint `source` (with its `config.json` text) by `recipe` into `sink`, one tensor
/// at a time in checkpoint order; `progress(tensors done, tensors)`. The source must be a float
/// checkpoint. Returns (quantized, float) tensor counts.
pub async fn convert_into(
    source: &Checkpoint<'_>,
    config_json: &str,
    recipe: &Recipe,
    sink: &mut impl TensorSink,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(usize, usize)> {
    let config = Config::from_json(config_json)?;
    if Recipe::from_config_json(config_json)?.is_some() {
        return Err(Error::InvalidArgument("the source checkpoint is already quantized".into()));
    }
    let expected = expected_tensors(&config);
    source.check(&expected, None)?;
    let (mut quantized, mut float) = (0, 0);
    for (n, spec) in expected.iter().enumerate() {
        let name = &spec.name;
        match (recipe.spec_for(name), spec.shape.as_slice()) {
            (Some(q), &[rows, cols]) => {
                let (values_name, scales_name) = packed_names(name).expect("a quantized role ends in .weight");
                let (mut data, mut scales) = (Vec::with_capacity(rows * q.row_bytes(cols)), Vec::with_capacity(rows * q.groups(cols)));
                for block in row_blocks(rows, cols * 4) {
                    let PackedMatrix { data: d, scales: s, .. } = source.quantized_rows(name, [rows, cols], block, q).await?;
                    data.extend_from_slice(&d);
                    scales.extend_from_slice(&s);
                }
                sink.add(&values_name, q.value_dtype(), &[rows, q.row_bytes(cols)], data).await?;
                let scale_bytes = match q.scale {
                    ScaleDtype::F16 => scales.iter().flat_map(|&s| half::f16::from_f32(s).to_le_bytes()).collect(),
                    ScaleDtype::F32 => scales.iter().flat_map(|&s| s.to_le_bytes()).collect(),
                };
                sink.add(&scales_name, q.scale_dtype(), &[rows, q.groups(cols)], scale_bytes).await?;
                quantized += 1;
            }
            (Some(_), _) => return Err(Error::Unsupported(format!("`{name}` is not a matrix and cannot be quantized"))),
            (None, shape) => {
                // Float tensors are copied as stored (same dtype, same bytes).
                let rows = shape.first().copied().unwrap_or(1);
                let row_values = shape.iter().skip(1).product::<usize>().max(1);
                let mut bytes = Vec::new();
                for block in row_blocks(rows, row_values * 4) {
                    bytes.extend_from_slice(&source.raw_rows(name, block).await?);
                }
                sink.add(name, source.dtype(name)?, shape, bytes).await?;
                float += 1;
            }
        }
        progress(n + 1, expected.len());
    }
    Ok((quantized, float))
}

/// `0..rows` in blocks of about [`READ_BYTES`] (at least one row each; one block for no rows).
fn row_blocks(rows: usize, row_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let per = (READ_BYTES / row_bytes.max(1)).max(1);
    if rows == 0 {
        return vec![0..0];
    }
    (0..rows).step_by(per).map(|s| s..(s + per).min(rows)).collect()
}

/// Converts checkpoint `source` (with its `config.json` text) into `writer`'s folder by `recipe`;
/// `progress(tensors done, tensors)`. The source must be a float checkpoint (memory-mapped: every
/// read is ready at once).
#[cfg(not(target_arch = "wasm32"))]
pub fn convert(
    source: &Checkpoint<'_>,
    config_json: &str,
    recipe: &Recipe,
    writer: ShardWriter,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Summary> {
    let mut writer = writer;
    let (quantized, float) = pollster_ready(convert_into(source, config_json, recipe, &mut writer, progress))?;
    let index = writer.finish()?;
    let bytes = index.metadata.shards.values().map(|s| s.size).sum();
    Ok(Summary { index, bytes, quantized_tensors: quantized, float_tensors: float })
}

/// `config.json` of the quantized checkpoint: the source's with `quantization_config` set.
pub fn quantized_config_json(config_json: &str, recipe: &Recipe) -> Result<String> {
    let mut value: serde_json::Value = serde_json::from_str(config_json).map_err(|e| Error::Config(e.to_string()))?;
    let block = serde_json::to_value(recipe.to_config()).map_err(|e| Error::Config(e.to_string()))?;
    value.as_object_mut().ok_or_else(|| Error::Config("config.json is not an object".into()))?.insert("quantization_config".into(), block);
    serde_json::to_string_pretty(&value).map_err(|e| Error::Config(e.to_string()))
}

/// The whole conversion of checkpoint folder `source` into folder `out`: shards, index, config and
/// tokenizer files. `shard_bytes`: the largest shard (see [`crate::weights::DEFAULT_SHARD_BYTES`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn convert_dir(source: &Path, out: &Path, recipe: &Recipe, shard_bytes: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Summary> {
    if source.canonicalize().ok() == out.canonicalize().ok() {
        return Err(Error::InvalidArgument("the output folder is the source folder".into()));
    }
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(name)).map_err(|e| Error::Io(format!("{}: {e}", dir.join(name).display())));
    let config_json = String::from_utf8(read(source, "config.json")?).map_err(|e| Error::Config(e.to_string()))?;
    let mapped = crate::weights::native::map_checkpoint(source)?;
    let checkpoint = mapped.checkpoint()?;
    let writer = ShardWriter::new(out, shard_bytes)?;
    let summary = convert(&checkpoint, &config_json, recipe, writer, progress)?;
    for name in COPIED_FILES {
        if source.join(name).is_file() {
            write_atomic(&out.join(name), &read(source, name)?)?;
        }
    }
    write_atomic(&out.join("config.json"), quantized_config_json(&config_json, recipe)?.as_bytes())?;
    Ok(summary)
}

/// Polls a future that is ready at once (reads from memory-mapped files never wait).
#[cfg(not(target_arch = "wasm32"))]
fn pollster_ready<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => Err(Error::Io("a checkpoint read did not complete at once".into())),
    }
}
