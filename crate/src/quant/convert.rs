//! The converter behind `dsocr quantize`: a float checkpoint in, a quantized sharded checkpoint out,
//! one tensor at a time, quantized as it is read (one row of f32 per thread), so memory stays far
//! below the model's size.
//! Same input and recipe → same bytes and hashes.

use std::path::Path;

use super::recipe::{Recipe, packed_names};
use super::scheme::{PackedMatrix, ScaleDtype};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, ShardIndex, ShardWriter, expected_tensors, write_atomic};

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

/// Converts checkpoint `source` (with its `config.json` text) into `writer`'s folder by `recipe`;
/// `progress(tensors done, tensors)`. The source must be a float checkpoint.
pub fn convert(
    source: &Checkpoint<'_>,
    config_json: &str,
    recipe: &Recipe,
    writer: ShardWriter,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Summary> {
    let config = Config::from_json(config_json)?;
    if Recipe::from_config_json(config_json)?.is_some() {
        return Err(Error::InvalidArgument("the source checkpoint is already quantized".into()));
    }
    let expected = expected_tensors(&config);
    source.check(&expected, None)?;
    let mut writer = writer;
    let (mut quantized, mut float) = (0, 0);
    for (n, spec) in expected.iter().enumerate() {
        let name = &spec.name;
        match (recipe.spec_for(name), spec.shape.as_slice()) {
            (Some(q), &[rows, cols]) => {
                let (values_name, scales_name) = packed_names(name).expect("a quantized role ends in .weight");
                let packed = pollster_ready(source.quantized_rows(name, [rows, cols], 0..rows, q))?;
                let PackedMatrix { data, scales, .. } = packed;
                writer.add(&values_name, q.value_dtype(), &[rows, q.row_bytes(cols)], data)?;
                let scale_bytes = match q.scale {
                    ScaleDtype::F16 => scales.iter().flat_map(|&s| half::f16::from_f32(s).to_le_bytes()).collect(),
                    ScaleDtype::F32 => scales.iter().flat_map(|&s| s.to_le_bytes()).collect(),
                };
                writer.add(&scales_name, q.scale_dtype(), &[rows, q.groups(cols)], scale_bytes)?;
                quantized += 1;
            }
            (Some(_), _) => return Err(Error::Unsupported(format!("`{name}` is not a matrix and cannot be quantized"))),
            (None, shape) => {
                // Float tensors are copied as stored (same dtype, same bytes).
                let rows = shape.first().copied().unwrap_or(1);
                let bytes = pollster_ready(source.raw_rows(name, 0..rows))?;
                writer.add(name, source.dtype(name)?, shape, bytes)?;
                float += 1;
            }
        }
        progress(n + 1, expected.len());
    }
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
fn pollster_ready<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => Err(Error::Io("a checkpoint read did not complete at once".into())),
    }
}
