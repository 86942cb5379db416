//! The model options `dsocr ocr` and `dsocr serve` share, and loading the engine they name.

use burn::tensor::{Device, FloatDType};
use clap::ValueEnum;

use super::gpu::Fault;
use super::progress::ProgressLine;
use crate::quant::{Preset, Recipe};
use crate::{Engine, EngineOptions, LoadOptions};

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Checkpoint: a directory in the hub layout (config.json, model-00001-of-000001.safetensors,
    /// tokenizer.json), a hub repo id (downloaded to the hub cache; HF_ENDPOINT, HF_HOME, HF_TOKEN honoured)
    /// or an http(s) base URL holding those files.
    #[arg(long, default_value = "deepseek-ai/DeepSeek-OCR")]
    pub model: String,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Float type of weights and activations: f16/bf16 halve the memory (where the device supports them).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Quantize a float checkpoint's weights while loading (q4: int4 language model, int8 vision;
    /// q8: int8 throughout): the numbers of the checkpoint `dsocr quantize` writes.
    #[arg(long, value_enum)]
    quantize: Option<PresetArg>,
    /// Group size of --quantize (32, 64 or 128 values per scale).
    #[arg(long, requires = "quantize")]
    group: Option<usize>,
    /// Largest image accepted, in pixels (width × height, read from the header before decoding):
    /// larger ones are refused, not decoded.
    #[arg(long, default_value_t = 100_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// Most tiles Gundam mode cuts a page into (default: the model's own, 9 for DeepSeek-OCR and 6
    /// for DeepSeek-OCR-2).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=12))]
    max_tiles: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PresetArg {
    Q4,
    Q8,
}

impl PresetArg {
    pub fn preset(self) -> Preset {
        match self {
            PresetArg::Q4 => Preset::Q4,
            PresetArg::Q8 => Preset::Q8,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Wgpu,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl ModelArgs {
    /// Downloads (if need be) and loads the checkpoint, with progress lines on stderr.
    pub fn load(&self) -> Result<Engine, String> {
        self.load_with(|_| {})
    }

    /// [`Self::load`] with the engine's settings adjusted by `adjust` first (the caller's limits).
    pub fn load_with(&self, adjust: impl FnOnce(&mut EngineOptions)) -> Result<Engine, String> {
        let (device, mut engine) = device(self.device)?;
        engine.decode_limits.max_pixels = self.max_pixels;
        engine.preprocess.max_tiles = self.max_tiles.map(|n| n as usize);
        adjust(&mut engine);
        engine.quantize = self.quantize.map(|p| Recipe::preset(p.preset(), self.group)).transpose().map_err(|e| e.to_string())?;
        let dtype = match self.dtype {
            DtypeArg::F32 => FloatDType::F32,
            DtypeArg::F16 => FloatDType::F16,
            DtypeArg::Bf16 => FloatDType::BF16,
        };
        let download = ProgressLine::default();
        let mut on_download = |file: &str, loaded: u64, total: Option<u64>| {
            let Some(total) = total.filter(|&t| t > 0) else { return };
            let mb = total as f64 / 1e6;
            download.update(loaded, total, |p| format!("downloading {file}: {p:>3}% of {mb:.1} MB"), || format!("downloaded {file} ({mb:.1} MB)"));
        };
        let load = ProgressLine::default();
        let load_started = std::time::Instant::now();
        let on_load = |loaded: u64, total: u64| {
            load.update(loaded, total, |p| format!("loading {}: {p:>3}%", self.model), || {
                format!("loaded {} in {:.1} s", self.model, load_started.elapsed().as_secs_f64())
            });
        };
        let gpu = !matches!(self.device, DeviceArg::Cpu);
        let options = LoadOptions { device, dtype, engine, on_download: Some(&mut on_download), on_load: Some(&on_load) };
        let engine = pollster::block_on(Engine::load(&self.model, options)).map_err(|e| Fault::describe(&e, &format!("loading {}", self.model)))?;
        if gpu {
            // wgpu compiles each kernel on first use: now, not during the first page.
            let started = std::time::Instant::now();
            pollster::block_on(engine.warm_up()).map_err(|e| match e {
                crate::Error::Gpu { .. } => Fault::describe(&e, "warming up the GPU"),
                other => format!("warming up the GPU: {other}"),
            })?;
            eprintln!("dsocr: compiled the GPU kernels in {:.1} s", started.elapsed().as_secs_f64());
        }
        Ok(engine)
    }
}

/// The compute device and the engine settings it wants (a GPU's include its binding limit).
fn device(arg: DeviceArg) -> Result<(Device, EngineOptions), String> {
    match arg {
        DeviceArg::Cpu => Ok((Device::flex(), EngineOptions::default())),
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => {
            let (device, setup) = pollster::block_on(Device::wgpu_options().init_with_setup_async())
                .map_err(|e| format!("no usable GPU adapter (wgpu): {e:?}"))?;
            super::gpu::remember(&setup.device);
            // As the browser: the model's kernels use 16 KiB of workgroup memory (WebGPU's minimum).
            let workgroup = setup.adapter.limits().max_compute_workgroup_storage_size;
            if workgroup < 16384 {
                return Err(format!("ADAPTER_LIMITS: the GPU offers {workgroup} bytes of workgroup memory, 16384 are needed; use --device cpu"));
            }
            let max = crate::engine::wgpu_max_tensor_bytes(&setup);
            eprintln!("dsocr: GPU {} ({:?}), largest binding {} MiB", setup.adapter.get_info().name, setup.backend, max >> 20);
            let device_faults = crate::gpu::DeviceFaults::watch(&setup.device);
            Ok((device, EngineOptions { device_faults, ..EngineOptions::gpu(max) }))
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceArg::Wgpu => Err("this dsocr was built without the `wgpu` feature".into()),
    }
}
