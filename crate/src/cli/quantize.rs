//! `dsocr quantize`: a float checkpoint (folder, hub repo id or URL) in, a quantized sharded
//! checkpoint out.

use std::path::PathBuf;

use super::model::PresetArg;
use super::progress::ProgressLine;
use crate::quant::Recipe;
use crate::quant::convert::convert_dir;

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The float checkpoint: a folder in the hub layout, a hub repo id or an http(s) base URL (as --model).
    source: String,
    /// q4: int4 language model (experts, attention, dense MLP, embedding, lm_head), int8 vision
    /// encoder; q8: int8 throughout. Norms, biases, convolutions, position tables and the router stay float.
    #[arg(long, value_enum)]
    scheme: PresetArg,
    /// Values per scale along the input axis: 32, 64 or 128.
    #[arg(long)]
    group: Option<usize>,
    /// Output folder (created; files already there with the same names are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Largest shard in MiB (browsers cache whole files).
    #[arg(long, default_value_t = 64)]
    shard_mib: usize,
}

pub fn run(args: &QuantizeArgs) -> Result<(), String> {
    let recipe = Recipe::preset(args.scheme.preset(), args.group).map_err(|e| e.to_string())?;
    let download = ProgressLine::default();
    let mut on_download = |file: &str, loaded: u64, total: Option<u64>| {
        let Some(total) = total.filter(|&t| t > 0) else { return };
        let mb = total as f64 / 1e6;
        download.update(loaded, total, |p| format!("downloading {file}: {p:>3}% of {mb:.1} MB"), || format!("downloaded {file} ({mb:.1} MB)"));
    };
    let source = crate::hub::resolve(&args.source, &mut on_download).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let line = ProgressLine::default();
    let mut progress = |done: usize, total: usize| {
        line.update(done as u64, total as u64, |p| format!("quantizing: {p:>3}% ({done}/{total} tensors)"), || {
            format!("quantized {total} tensors in {:.1} s", started.elapsed().as_secs_f64())
        });
    };
    let summary = convert_dir(&source, &args.out, &recipe, args.shard_mib.max(1) << 20, &mut progress).map_err(|e| e.to_string())?;
    eprintln!(
        "dsocr: wrote {} ({} shards, {:.1} MB; {} tensors quantized, {} kept in float)",
        args.out.display(),
        summary.index.metadata.shards.len(),
        summary.bytes as f64 / 1e6,
        summary.quantized_tensors,
        summary.float_tensors
    );
    Ok(())
}
