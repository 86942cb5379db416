//! Builds burn modules from checkpoint tensors by their original names, converting PyTorch layouts.
//! Loading is async because a ranged checkpoint fetches tensors as they are needed; from memory
//! every future is ready at once.

use std::cell::Cell;

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};

use super::Checkpoint;
use super::values::{Half, transpose};
use crate::error::Result;
use crate::gpu::DevicePacked;
use crate::quant::{PackedMatrix, QLinear, Recipe};

/// Called with `(bytes loaded, bytes in the checkpoint)` after each tensor.
pub type LoadProgress<'p> = &'p dyn Fn(u64, u64);

/// Reads named tensors from a checkpoint onto a device.
pub struct Loader<'c, 'b> {
    checkpoint: &'c Checkpoint<'b>,
    device: Device,
    max_tensor_bytes: usize,
    stacked_experts: bool,
    threads: usize,
    progress: Option<LoadProgress<'c>>,
    loaded: Cell<u64>,
    /// The checkpoint's own `quantization_config` (how its packed tensors are laid out).
    stored: Option<Recipe>,
    /// Quantize float tensors as they are read (load-time quantization).
    quantize: Option<Recipe>,
    /// Keep quantized matrices packed on the host for the CPU kernels (else dequantize them onto
    /// the device).
    host_kernels: bool,
    /// Keep quantized matrices packed on the GPU for the crate's GPU kernels (where the device
    /// runs them, see [`crate::gpu::available`]).
    device_kernels: bool,
    /// The device's float type when it is a half one: float tensors are built in it directly.
    half: Option<Half>,
}

/// A weight matrix as read: float values, or packed (stored so, or quantized at load time).
pub enum Matrix {
    Dense(Vec<f32>),
    Packed(PackedMatrix),
}

impl Matrix {
    /// Float values, row-major (packed ones dequantized).
    pub fn into_dense(self) -> Vec<f32> {
        match self {
            Matrix::Dense(values) => values,
            Matrix::Packed(packed) => packed.dequantize(),
        }
    }

    /// Matrices of `cols` columns stacked by rows: packed when all are, with one spec (a recipe
    /// gives one role one spec), else float.
    pub fn concat_rows(parts: Vec<Matrix>, cols: usize) -> Matrix {
        let spec = match parts.first() {
            Some(Matrix::Packed(p)) => Some(p.spec),
            _ => None,
        };
        match spec.filter(|&spec| parts.iter().all(|p| matches!(p, Matrix::Packed(m) if m.spec == spec))) {
            Some(spec) => {
                let packed = parts.into_iter().filter_map(|p| if let Matrix::Packed(m) = p { Some(m) } else { None }).collect();
                Matrix::Packed(PackedMatrix::concat_rows(packed, cols, spec))
            }
            None => Matrix::Dense(parts.into_iter().flat_map(Matrix::into_dense).collect()),
        }
    }

    /// Bytes per row on the device as [`Loader::device_matrix`] uploads it.
    fn device_row_bytes(&self, cols: usize, half: bool) -> usize {
        match self {
            Matrix::Packed(m) => m.groups() * m.group_bytes(),
            Matrix::Dense(_) if half => 4 * cols.div_ceil(2),
            Matrix::Dense(_) => 4 * cols,
        }
    }
}

impl<'c, 'b> Loader<'c, 'b> {
    pub fn new(checkpoint: &'c Checkpoint<'b>, device: &Device) -> Self {
        let half = Half::of(device);
        Self { checkpoint, device: device.clone(), max_tensor_bytes: usize::MAX, stacked_experts: false, threads: 1, progress: None, loaded: Cell::new(0), stored: None, quantize: None, host_kernels: false, device_kernels: false, half }
    }

    /// The checkpoint's recipe (from its `config.json`), needed to read its packed tensors.
    pub fn with_stored_recipe(mut self, recipe: Option<Recipe>) -> Self {
        self.stored = recipe;
        self
    }

    /// Quantize float weights as they are read, by `recipe` (same bytes as the converter writes).
    pub fn with_quantize(mut self, recipe: Option<Recipe>) -> Self {
        self.quantize = recipe;
        self
    }

    /// Keep quantized matrices packed on the host and multiply them with the CPU kernels, and the
    /// decoder's KV cache in host memory: for the CPU backend. Off (the default), quantized
    /// matrices are dequantized onto the device and the cache is device tensors.
    pub fn with_host_kernels(mut self, on: bool) -> Self {
        self.host_kernels = on;
        self
    }

    /// See [`Loader::with_host_kernels`].
    pub fn host_kernels(&self) -> bool {
        self.host_kernels
    }

    /// Keep quantized matrices packed on the GPU and multiply them with the crate's GPU kernels
    /// (`gpu/`), when `on`, the device runs them and host kernels are off. Else quantized matrices
    /// are dequantized onto the device when loaded.
    pub fn with_device_kernels(mut self, on: bool) -> Self {
        self.device_kernels = on;
        self
    }

    /// See [`Loader::with_device_kernels`].
    pub fn device_kernels(&self) -> bool {
        self.device_kernels && !self.host_kernels && crate::gpu::available(&self.device)
    }

    /// Rows `rows` of the `(rows, cols)` matrix `name`: packed when the checkpoint stores it so or
    /// the load-time recipe quantizes it, else float.
    pub async fn matrix_rows(&self, name: &str, [total, cols]: [usize; 2], rows: std::ops::Range<usize>) -> Result<Matrix> {
        if self.checkpoint.is_packed(name) {
            let spec = Recipe::stored_spec(self.stored.as_ref(), name)?;
            self.count_bytes(spec.stored_bytes(rows.len(), cols));
            return Ok(Matrix::Packed(self.checkpoint.packed_rows(name, spec, cols, rows).await?));
        }
        let matrix = match self.quantize.as_ref().and_then(|r| r.spec_for(name)) {
            Some(spec) => Matrix::Packed(self.checkpoint.quantized_rows(name, [total, cols], rows.clone(), spec).await?),
            None => Matrix::Dense(self.checkpoint.f32_rows(name, &[total, cols], rows.clone()).await?),
        };
        self.count(name, rows.len() * cols);
        Ok(matrix)
    }

    /// The whole `(rows, cols)` matrix `name` (see [`Loader::matrix_rows`]).
    pub async fn matrix(&self, name: &str, shape: [usize; 2]) -> Result<Matrix> {
        self.matrix_rows(name, shape, 0..shape[0]).await
    }

    /// The matrix packed on the host when it is quantized and this loader keeps packed matrices
    /// (`None`: load it as float, e.g. with [`Loader::row_shards`]).
    pub async fn packed_on_host(&self, name: &str, shape: [usize; 2]) -> Result<Option<PackedMatrix>> {
        if !(self.host_kernels && self.is_quantized(name)) {
            return Ok(None);
        }
        Ok(match self.matrix(name, shape).await? {
            Matrix::Packed(packed) => Some(packed),
            Matrix::Dense(_) => None,
        })
    }

    /// Build MoE layers with their routed experts stacked per tensor, for decoding without reading
    /// the routing back to the host (see `model::moe`); GPUs want this, the CPU does not.
    pub fn with_stacked_experts(mut self, stacked: bool) -> Self {
        self.stacked_experts = stacked;
        self
    }

    pub fn stacked_experts(&self) -> bool {
        self.stacked_experts
    }

    /// Threads the model spreads work over itself where burn's CPU backend would use one: a decoding
    /// step's matrix–vector products (`model::ops::linear_par`), a step's experts, SAM's MLP rows
    /// (`model::ops::rows_par`). The CPU's thread count on the CPU; 1 (the default) on GPUs.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn max_tensor_bytes(&self) -> usize {
        self.max_tensor_bytes
    }

    /// The largest tensor the device can bind (WebGPU's `maxStorageBufferBindingSize`): vocabulary-sized
    /// matrices are split into row shards within it (see [`Loader::row_shards`]).
    pub fn with_max_tensor_bytes(mut self, bytes: usize) -> Self {
        self.max_tensor_bytes = bytes.max(1);
        self
    }

    pub fn with_progress(mut self, progress: LoadProgress<'c>) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Host copy of a tensor's values (f32), shape-checked.
    pub async fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let values = self.checkpoint.f32_values(name, shape).await?;
        self.count(name, values.len());
        Ok(values)
    }

    /// A float tensor in the device's float type, shape-checked.
    pub async fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let rows = shape.first().copied().unwrap_or(1);
        let data = self.checkpoint.float_data(name, &shape, 0..rows, false, self.half).await?;
        self.count(name, shape.iter().product());
        Ok(Tensor::from_data(data, &self.device))
    }

    pub async fn param<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape).await?))
    }

    /// Rows `rows` of the `(rows, cols)` matrix `name` in float, transposed to `(cols, rows.len())`:
    /// widened and transposed in one pass, or dequantized then transposed.
    async fn transposed_rows(&self, name: &str, [total, cols]: [usize; 2], rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        if self.is_quantized(name) {
            let n = rows.len();
            return Ok(transpose(&self.matrix_rows(name, [total, cols], rows).await?.into_dense(), n, cols));
        }
        let values = self.checkpoint.f32_rows_transposed(name, [total, cols], rows).await?;
        self.count(name, values.len());
        Ok(values)
    }

    /// [`Loader::transposed_rows`] as tensor data in the device's float type (a half type straight
    /// from the stored values when it is not quantized).
    async fn transposed_data(&self, name: &str, [total, cols]: [usize; 2], rows: std::ops::Range<usize>) -> Result<TensorData> {
        let n = rows.len();
        if self.is_quantized(name) || self.half.is_none() {
            return Ok(TensorData::new(self.transposed_rows(name, [total, cols], rows).await?, [cols, n]));
        }
        let data = self.checkpoint.float_data(name, &[total, cols], rows, true, self.half).await?;
        self.count(name, n * cols);
        Ok(data)
    }

    /// Rows `rows` of the `(rows, cols)` matrix `name` as tensor data in the device's float type
    /// (dequantized if quantized).
    async fn rows_data(&self, name: &str, [total, cols]: [usize; 2], rows: std::ops::Range<usize>) -> Result<TensorData> {
        let n = rows.len();
        if self.is_quantized(name) {
            return Ok(TensorData::new(self.matrix_rows(name, [total, cols], rows).await?.into_dense(), [n, cols]));
        }
        let data = self.checkpoint.float_data(name, &[total, cols], rows, false, self.half).await?;
        self.count(name, n * cols);
        Ok(data)
    }

    /// The `(d_out, d_in)` weights `names` transposed and stacked: `(names.len(), d_in, d_out)`
    /// tensor data in the device's float type (half types straight from the stored values).
    pub async fn stacked_transposed(&self, names: &[String], [d_out, d_in]: [usize; 2]) -> Result<TensorData> {
        let dtype = self.half.map_or(burn::tensor::DType::F32, Half::dtype);
        let mut bytes = Vec::with_capacity(names.len() * d_in * d_out * dtype.size());
        for name in names {
            let data = self.transposed_data(name, [d_out, d_in], 0..d_out).await?.convert_dtype(dtype);
            bytes.extend_from_slice(data.as_bytes());
        }
        Ok(TensorData::from_bytes_vec(bytes, [names.len(), d_in, d_out], dtype))
    }

    /// The matrix as rows of words on the GPU where this loader keeps matrices for the crate's GPU
    /// kernels (`None`: load it as a burn tensor): packed when it is quantized, else — for the
    /// language model's matrices (decoder projections, experts, embedding, lm_head) — its float
    /// values as f16 or f32 words, so a float checkpoint's decoding runs the same kernels. In row
    /// shards within the binding limit.
    pub async fn packed_on_device(&self, name: &str, shape: [usize; 2]) -> Result<Option<DevicePacked>> {
        if !self.device_kernels() || !(self.is_quantized(name) || Self::language_model(name)) {
            return Ok(None);
        }
        Ok(Some(self.device_matrix(self.matrix(name, shape).await?, shape, None)))
    }

    /// A matrix as read, uploaded as rows of words (see [`Loader::packed_on_device`]), in shards
    /// of `rows_per_shard` rows when given, else within the binding limit.
    pub fn device_matrix(&self, matrix: Matrix, [rows, cols]: [usize; 2], rows_per_shard: Option<usize>) -> DevicePacked {
        match matrix {
            Matrix::Packed(packed) => match rows_per_shard {
                Some(n) => DevicePacked::upload_in_shards(&packed, &self.device, n),
                None => DevicePacked::upload(&packed, &self.device, self.max_tensor_bytes),
            },
            Matrix::Dense(values) => {
                let half = matches!(self.half, Some(Half::F16));
                DevicePacked::upload_float(&values, rows, cols, half, &self.device, self.max_tensor_bytes, rows_per_shard)
            }
        }
    }

    /// Matrices read by `names` (each `(rows, cols)`) stacked by rows and uploaded as rows of words
    /// in shards of whole matrices within the binding limit: an expert stack.
    pub async fn device_stack(&self, names: &[String], [rows, cols]: [usize; 2]) -> Result<DevicePacked> {
        let stacked = self.stacked(names, &vec![rows; names.len()], cols).await?;
        let half = matches!(self.half, Some(Half::F16));
        let per_shard = (self.max_tensor_bytes / (stacked.device_row_bytes(cols, half) * rows).max(1)).clamp(1, names.len());
        Ok(self.device_matrix(stacked, [names.len() * rows, cols], Some(per_shard * rows)))
    }

    /// The language model's matrices (by their roles): what the GPU kernels take as float words.
    fn language_model(name: &str) -> bool {
        matches!(crate::quant::Role::of(name), Some(crate::quant::Role::Decoder | crate::quant::Role::Embedding | crate::quant::Role::LmHead))
    }

    /// Whether `name` is stored packed or quantized at load time.
    pub fn is_quantized(&self, name: &str) -> bool {
        self.checkpoint.is_packed(name) || self.quantize.as_ref().and_then(|r| r.spec_for(name)).is_some()
    }

    /// A linear layer that may be quantized: packed on the host when this loader keeps packed
    /// matrices and the weight is quantized, else a float `Linear` (dequantized if need be).
    pub async fn qlinear(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<QLinear> {
        let weight = format!("{prefix}.weight");
        let bias_of = async || if bias { self.tensor(&format!("{prefix}.bias"), [d_out]).await.map(Some) } else { Ok(None) };
        if let Some(packed) = self.packed_on_host(&weight, [d_out, d_in]).await? {
            return Ok(QLinear::packed(packed, bias_of().await?, self.threads));
        }
        if let Some(packed) = self.packed_on_device(&weight, [d_out, d_in]).await? {
            return Ok(QLinear::on_device(packed, bias_of().await?));
        }
        Ok(QLinear::dense(self.linear(prefix, d_in, d_out, bias).await?, self.threads))
    }

    /// The matrices `names` (`rows[i]` × `cols` each) read and stacked by rows.
    async fn stacked(&self, names: &[String], rows: &[usize], cols: usize) -> Result<Matrix> {
        let mut parts = Vec::with_capacity(names.len());
        for (name, &r) in names.iter().zip(rows) {
            parts.push(self.matrix(name, [r, cols]).await?);
        }
        Ok(Matrix::concat_rows(parts, cols))
    }

    /// Whether [`Loader::qlinear_concat`] makes the layers `prefixes` one matrix for the crate's
    /// kernels: on the GPU (quantized or the language model's), or packed on the host (all
    /// quantized); else they stay separate float layers, as the checkpoint has them.
    pub fn stacks_for_kernels(&self, prefixes: &[String]) -> bool {
        let weight = |p: &String| format!("{p}.weight");
        if self.device_kernels() {
            prefixes.iter().all(|p| self.is_quantized(&weight(p)) || Self::language_model(&weight(p)))
        } else {
            self.host_kernels && prefixes.iter().all(|p| self.is_quantized(&weight(p)))
        }
    }

    /// Bias-free linear layers `prefixes` of one input as one layer, their outputs side by side in
    /// that order (`d_outs` each): the weights stacked by output rows — on the GPU or packed on the
    /// host where [`Loader::stacks_for_kernels`] says so, else in float.
    pub async fn qlinear_concat(&self, prefixes: &[String], d_in: usize, d_outs: &[usize]) -> Result<QLinear> {
        let names: Vec<String> = prefixes.iter().map(|p| format!("{p}.weight")).collect();
        if self.stacks_for_kernels(prefixes) {
            let stacked = self.stacked(&names, d_outs, d_in).await?;
            if self.device_kernels() {
                let total = d_outs.iter().sum();
                return Ok(QLinear::on_device(self.device_matrix(stacked, [total, d_in], None), None));
            }
            if let Matrix::Packed(packed) = stacked {
                return Ok(QLinear::packed(packed, None, self.threads));
            }
        }
        let total = d_outs.iter().sum();
        let mut weights = Vec::with_capacity(names.len());
        for (name, &d_out) in names.iter().zip(d_outs) {
            weights.push(Tensor::<2>::from_data(self.transposed_data(name, [d_out, d_in], 0..d_out).await?, &self.device));
        }
        let mut linear = LinearConfig::new(d_in, total).with_bias(false).init(&self.device);
        linear.weight = Param::from_tensor(Tensor::cat(weights, 1));
        Ok(QLinear::dense(linear, self.threads))
    }

    /// `prefix.weight` (PyTorch `(out, in)`, stored transposed as burn's `[in, out]`) and optional
    /// `prefix.bias`, in float (dequantized if quantized).
    pub async fn linear(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        let w = self.transposed_data(&format!("{prefix}.weight"), [d_out, d_in], 0..d_out).await?;
        let mut linear = LinearConfig::new(d_in, d_out).with_bias(bias).init(&self.device);
        linear.weight = Param::from_tensor(Tensor::from_data(w, &self.device));
        if bias {
            linear.bias = Some(self.param(&format!("{prefix}.bias"), [d_out]).await?);
        }
        Ok(linear)
    }

    /// A `(rows, cols)` matrix as consecutive row shards of at most [`Loader::with_max_tensor_bytes`]
    /// each (one shard when it fits), each read from the checkpoint on its own. `transpose` stores
    /// each shard as `(cols, shard rows)`, the layout a bias-free Linear with `rows` outputs wants.
    pub async fn row_shards(&self, name: &str, [rows, cols]: [usize; 2], transpose: bool) -> Result<Vec<Tensor<2>>> {
        let per_shard = self.rows_per_shard(cols);
        let mut shards = Vec::with_capacity(rows.div_ceil(per_shard));
        let mut start = 0;
        while start < rows {
            let end = (start + per_shard).min(rows);
            shards.push(if transpose {
                Tensor::from_data(self.transposed_data(name, [rows, cols], start..end).await?, &self.device)
            } else {
                Tensor::from_data(self.rows_data(name, [rows, cols], start..end).await?, &self.device)
            });
            start = end;
        }
        Ok(shards)
    }

    /// Rows of `cols` f32 values that fit the binding limit (at least one).
    fn rows_per_shard(&self, cols: usize) -> usize {
        (self.max_tensor_bytes / (cols.max(1) * std::mem::size_of::<f32>())).max(1)
    }

    /// LayerNorm over the last axis from `prefix.weight` / `prefix.bias`.
    pub async fn layer_norm(&self, prefix: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(&self.device);
        norm.gamma = self.param(&format!("{prefix}.weight"), [d]).await?;
        norm.beta = Some(self.param(&format!("{prefix}.bias"), [d]).await?);
        Ok(norm)
    }

    /// A square-kernel Conv2d with symmetric padding from `prefix.weight` (`(out, in, k, k)`) and optional bias.
    pub async fn conv2d(&self, prefix: &str, [c_in, c_out]: [usize; 2], kernel: usize, stride: usize, padding: usize, bias: bool) -> Result<Conv2d> {
        let mut conv = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
            .with_bias(bias)
            .init(&self.device);
        conv.weight = self.param(&format!("{prefix}.weight"), [c_out, c_in, kernel, kernel]).await?;
        conv.bias = if bias { Some(self.param(&format!("{prefix}.bias"), [c_out]).await?) } else { None };
        Ok(conv)
    }

    fn count(&self, name: &str, elements: usize) {
        self.count_bytes(elements * self.checkpoint.element_bytes(name).unwrap_or(4));
    }

    fn count_bytes(&self, bytes: usize) {
        self.loaded.set(self.loaded.get() + bytes as u64);
        if let Some(progress) = self.progress {
            progress(self.loaded.get(), self.checkpoint.data_len() as u64);
        }
    }
}
