//! The decode loop: prefill once, then one token at a time with the KV cache; greedy or sampled; the
//! reference's repetition rules; stop ids, token and context limits; streaming and cancellation (spec §9).

use std::ops::ControlFlow;

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::error::{Error, Result};
use crate::model::{Decoder, KvCache, read_f32};

/// `<td>` and `</td>`: the official vLLM runner never bans them (tables repeat cells legitimately).
pub const TABLE_CELL_TOKENS: [u32; 2] = [128821, 128822];

/// Which repeated n-grams are forbidden.
#[derive(Debug, Clone, PartialEq)]
pub enum RepeatGuard {
    Off,
    /// The official vLLM logits processor: looks only at generated ids within the last `window`,
    /// never bans `whitelist` ids.
    Windowed { ngram: usize, window: usize, whitelist: Vec<u32> },
    /// transformers' `no_repeat_ngram_size`: the whole sequence (prompt + generated), no window.
    WholeSequence { ngram: usize },
}

impl RepeatGuard {
    /// The official image runner's setting (n 30, window 90, `<td>`/`</td>` whitelisted): the default.
    pub fn vllm() -> Self {
        RepeatGuard::Windowed { ngram: 30, window: 90, whitelist: TABLE_CELL_TOKENS.to_vec() }
    }

    /// The hub code's `infer` (`no_repeat_ngram_size=20`), for parity with it.
    pub fn hf() -> Self {
        RepeatGuard::WholeSequence { ngram: 20 }
    }

    /// Token ids banned as the next token.
    pub fn banned(&self, prompt: &[u32], generated: &[u32]) -> Vec<u32> {
        match self {
            RepeatGuard::Off => Vec::new(),
            RepeatGuard::Windowed { ngram, window, whitelist } => {
                let n = *ngram;
                if n == 0 || generated.len() < n {
                    return Vec::new();
                }
                let len = generated.len();
                let prefix = &generated[len - (n - 1)..];
                let mut banned: Vec<u32> = (len.saturating_sub(*window)..=len - n)
                    .filter(|&i| &generated[i..i + n - 1] == prefix)
                    .map(|i| generated[i + n - 1])
                    .filter(|t| !whitelist.contains(t))
                    .collect();
                banned.sort_unstable();
                banned.dedup();
                banned
            }
            RepeatGuard::WholeSequence { ngram } => {
                let n = *ngram;
                let len = prompt.len() + generated.len();
                if n == 0 || len < n {
                    return Vec::new();
                }
                let at = |i: usize| if i < prompt.len() { prompt[i] } else { generated[i - prompt.len()] };
                let mut banned: Vec<u32> = (0..=len - n)
                    .filter(|&i| (0..n - 1).all(|k| at(i + k) == at(len - (n - 1) + k)))
                    .map(|i| at(i + n - 1))
                    .collect();
                banned.sort_unstable();
                banned.dedup();
                banned
            }
        }
    }
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Arg-max (the reference's `temperature=0`); ties go to the lowest id, like `torch.argmax`.
    Greedy,
    /// Temperature, then top-k (0 = off), then top-p (1.0 = off), then a draw from a seeded ChaCha8.
    Sample { temperature: f32, top_k: usize, top_p: f32, seed: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// Prompt + generated tokens never exceed this (the official vLLM runner uses 8192).
    pub context_limit: usize,
    pub sampling: Sampling,
    pub repeat_guard: RepeatGuard,
    /// Generation ends when one of these is chosen (EOS, id 1, by default); it is not included in the output.
    pub stop_ids: Vec<u32>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 8192,
            context_limit: 8192,
            sampling: Sampling::Greedy,
            repeat_guard: RepeatGuard::vllm(),
            stop_ids: vec![1],
        }
    }
}

/// Why generation ended. Everything but `Stop` means the model did not finish on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id (normally EOS) was generated.
    Stop(u32),
    MaxNewTokens,
    ContextLimit,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

impl Generated {
    /// True unless the output ended with a stop id ("ended without EOS").
    pub fn truncated(&self) -> bool {
        !matches!(self.finish, FinishReason::Stop(_))
    }
}

/// Generates from a prompt whose embeddings (`(S, hidden)`, images already spliced in) and ids are
/// given. `on_token` sees every generated token as it is chosen; returning `Break` cancels.
pub async fn generate(
    decoder: &Decoder,
    prompt_embeds: Tensor<2>,
    prompt_ids: &[u32],
    options: &GenerationOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generated> {
    let item = BatchItem { prompt_embeds, prompt_ids, options };
    generate_batch(decoder, vec![item], |_, id| on_token(id)).await.pop().expect("one result per prompt")
}

/// One prompt of a [`generate_batch`] call or a [`Batch`].
pub struct BatchItem<'a> {
    pub prompt_embeds: Tensor<2>,
    pub prompt_ids: &'a [u32],
    pub options: &'a GenerationOptions,
}

/// [`generate`] for several prompts at once: each is prefilled alone, then every decoding step runs
/// the sequences still going as one batch ([`Decoder::step_batch`]: each weight read once per step
/// for all of them). Sequences end on their own (stop id, limits, or `on_token(index, id)` returning
/// `Break`, which cancels that one only); the results are what separate [`generate`] calls give.
pub async fn generate_batch(
    decoder: &Decoder,
    items: Vec<BatchItem<'_>>,
    mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
) -> Vec<Result<Generated>> {
    let mut done: Vec<Option<Result<Generated>>> = (0..items.len()).map(|_| None).collect();
    let mut batch = Batch::new(decoder);
    for (i, item) in items.into_iter().enumerate() {
        if let Err(e) = batch.join(i, item).await {
            done[i] = Some(Err(e));
        }
    }
    while !batch.is_empty() {
        for (i, result) in batch.step(&mut on_token).await {
            done[i] = Some(result);
        }
    }
    done.into_iter().map(|d| d.expect("every sequence ended")).collect()
}

/// Sequences decoded together that join and leave between steps (continuous batching): a sequence
/// joins with its prefill and takes part from the next step on; each step chooses every
/// sequence's next token, lets those that end leave, and runs one decoding step for the others, so
/// each weight is read once a step for all of them. `K` names a sequence to the caller.
pub struct Batch<'d, K> {
    decoder: &'d Decoder,
    seqs: Vec<(K, Sequence)>,
}

impl<'d, K: Copy> Batch<'d, K> {
    pub fn new(decoder: &'d Decoder) -> Self {
        Self { decoder, seqs: Vec::new() }
    }

    /// Sequences still going.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Checks and prefills a prompt; a prompt that fails leaves the batch as it was.
    pub async fn join(&mut self, key: K, item: BatchItem<'_>) -> Result<()> {
        let seq = Sequence::start(self.decoder, item.prompt_embeds, item.prompt_ids, item.options).await?;
        self.seqs.push((key, seq));
        Ok(())
    }

    /// Chooses each sequence's next token (`on_token(key, id)`; `Break` cancels that sequence), then
    /// one decoding step for those that go on. Returns the sequences that ended, in the batch's order.
    pub async fn step(&mut self, on_token: &mut impl FnMut(K, u32) -> ControlFlow<()>) -> Vec<(K, Result<Generated>)> {
        let mut ended = Vec::new();
        let mut going = Vec::with_capacity(self.seqs.len());
        for (key, mut seq) in self.seqs.drain(..) {
            match seq.advance(&mut |id| on_token(key, id)) {
                Ok(None) => going.push((key, seq)),
                Ok(Some(finish)) => ended.push((key, Ok(Generated { tokens: seq.tokens, finish }))),
                Err(e) => ended.push((key, Err(e))),
            }
        }
        self.seqs = going;
        if self.seqs.is_empty() {
            return ended;
        }
        if let Err(e) = step_batch(self.decoder, &mut self.seqs).await {
            // A failed step fails every sequence that was in it (one of them with the error itself).
            let message = e.to_string();
            let mut error = Some(e);
            for (key, _) in self.seqs.drain(..) {
                ended.push((key, Err(error.take().unwrap_or_else(|| Error::Backend(message.clone())))));
            }
        }
        ended
    }
}

/// One decoding step for `seqs`: their last tokens in, what their next tokens are chosen from stored.
async fn step_batch<K>(decoder: &Decoder, seqs: &mut [(K, Sequence)]) -> Result<()> {
    let ids: Vec<u32> = seqs.iter().map(|(_, s)| *s.tokens.last().expect("advance chose a token")).collect();
    let x = decoder.embed(&ids, &seqs[0].1.device)?;
    let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|(_, s)| &mut s.cache).collect();
    // One sequence: the single-sequence path (no per-row split of attention).
    let hidden = match caches.as_mut_slice() {
        [cache] => decoder.forward(x, cache).await?,
        _ => decoder.step_batch(x, &mut caches).await?,
    };
    let mut seqs: Vec<&mut Sequence> = seqs.iter_mut().map(|(_, s)| s).collect();
    pick(decoder, decoder.logits(hidden), &mut seqs).await
}

/// Stores each sequence's [`Next`] from the logits `(B, vocab)` of their next tokens (row i:
/// `seqs[i]`). Where the decoder picks on the device and every sequence is greedy, each row's
/// banned ids are set to −∞ there and only the choice comes back (three numbers a row, one
/// readback); otherwise the logits are read.
async fn pick(decoder: &Decoder, logits: Tensor<2>, seqs: &mut [&mut Sequence]) -> Result<()> {
    let [rows, vocab] = logits.dims();
    if !(decoder.picks_on_device() && seqs.iter().all(|s| s.rng.is_none())) {
        let values = read_f32(logits).await?;
        for (row, seq) in seqs.iter_mut().enumerate() {
            seq.next = Next::Logits(values[row * vocab..(row + 1) * vocab].to_vec());
        }
        return Ok(());
    }
    let banned: Vec<i64> = seqs
        .iter()
        .enumerate()
        .flat_map(|(row, seq)| seq.banned().into_iter().filter(|&id| (id as usize) < vocab).map(move |id| (row * vocab + id as usize) as i64))
        .collect();
    let device = logits.device();
    let logits = if banned.is_empty() {
        logits
    } else {
        let n = banned.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(banned, [n]), &device);
        let minus_infinity = Tensor::<1>::full([n], f32::NEG_INFINITY, &device);
        logits.reshape([rows * vocab]).select_assign(0, index, minus_infinity, IndexingUpdateOp::Add).reshape([rows, vocab])
    };
    let picks = read_f32(crate::gpu::greedy(logits)).await?;
    for (row, seq) in seqs.iter_mut().enumerate() {
        let (at, nan) = (picks[row * 3] as usize, picks[row * 3 + 2] as usize);
        seq.next = Next::Picked(if nan < vocab {
            Err(format!("logit {nan} is NaN"))
        } else if at < vocab {
            Ok(at as u32)
        } else {
            Err("every token is banned or has zero probability".into())
        });
    }
    Ok(())
}

/// What a sequence's next token is chosen from.
enum Next {
    /// Nothing (`max_new_tokens` is 0).
    Nothing,
    /// The logits, on the host: the repeat guard and greedy or sampled choice run there.
    Logits(Vec<f32>),
    /// A greedy choice made on the device with the repeat guard applied (see [`pick`]), or why
    /// there is none.
    Picked(std::result::Result<u32, String>),
}

/// A generation in progress: the prompt, its cache, what was generated, the next logits.
struct Sequence {
    prompt_ids: Vec<u32>,
    options: GenerationOptions,
    /// Prompt + generated tokens never reach past this: `context_limit` or the model's positions.
    limit: usize,
    rng: Option<ChaCha8Rng>,
    cache: KvCache,
    tokens: Vec<u32>,
    next: Next,
    device: burn::tensor::Device,
}

impl Sequence {
    /// Checks the prompt and prefills it.
    async fn start(decoder: &Decoder, prompt_embeds: Tensor<2>, prompt_ids: &[u32], options: &GenerationOptions) -> Result<Sequence> {
        let [s, _] = prompt_embeds.dims();
        if s != prompt_ids.len() {
            return Err(Error::InvalidArgument(format!("{s} prompt embeddings for {} prompt ids", prompt_ids.len())));
        }
        if s == 0 {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        // The model's positions bound the context too: a sequence that reaches them ends alone
        // (`ContextLimit`) instead of failing the batching step it is in.
        let limit = options.context_limit.min(decoder.max_positions());
        if s >= limit {
            return Err(Error::ContextOverflow { length: s + 1, limit });
        }
        let device = prompt_embeds.device();
        let rng = match options.sampling {
            Sampling::Sample { seed, .. } => Some(ChaCha8Rng::seed_from_u64(seed)),
            Sampling::Greedy => None,
        };
        let mut seq = Sequence { prompt_ids: prompt_ids.to_vec(), options: options.clone(), limit, rng, cache: KvCache::default(), tokens: Vec::new(), next: Next::Nothing, device };
        if options.max_new_tokens > 0 {
            let hidden = decoder.forward(prompt_embeds, &mut seq.cache).await?;
            let [s, d] = hidden.dims();
            pick(decoder, decoder.logits(hidden.slice([s - 1..s, 0..d])), &mut [&mut seq]).await?;
        }
        Ok(seq)
    }

    /// Ids the repeat guard bans as the next token.
    fn banned(&self) -> Vec<u32> {
        self.options.repeat_guard.banned(&self.prompt_ids, &self.tokens)
    }

    /// Chooses the next token from the logits and tells `on_token`; `Some` when the sequence ends
    /// (the stop id is not kept), `None` when it needs another step.
    fn advance(&mut self, on_token: &mut impl FnMut(u32) -> ControlFlow<()>) -> Result<Option<FinishReason>> {
        let options = &self.options;
        if options.max_new_tokens == 0 {
            return Ok(Some(FinishReason::MaxNewTokens));
        }
        let token = match std::mem::replace(&mut self.next, Next::Nothing) {
            Next::Picked(choice) => choice.map_err(Error::Backend)?,
            Next::Logits(mut logits) => {
                for id in self.banned() {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                match (&options.sampling, self.rng.as_mut()) {
                    (Sampling::Sample { temperature, top_k, top_p, .. }, Some(rng)) => sample(&logits, *temperature, *top_k, *top_p, rng)?,
                    _ => argmax(&logits)?,
                }
            }
            Next::Nothing => return Err(Error::Backend("no logits to choose the next token from".into())),
        };
        if options.stop_ids.contains(&token) {
            return Ok(Some(FinishReason::Stop(token)));
        }
        self.tokens.push(token);
        if on_token(token).is_break() {
            return Ok(Some(FinishReason::Cancelled));
        }
        if self.tokens.len() >= options.max_new_tokens {
            return Ok(Some(FinishReason::MaxNewTokens));
        }
        if self.prompt_ids.len() + self.tokens.len() >= self.limit {
            return Ok(Some(FinishReason::ContextLimit));
        }
        Ok(None)
    }
}

fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            return Err(Error::Backend(format!("logit {i} is NaN")));
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    match best {
        Some((i, v)) if v > f32::NEG_INFINITY => Ok(i as u32),
        _ => Err(Error::Backend("every token is banned or has zero probability".into())),
    }
}

fn sample(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, rng: &mut ChaCha8Rng) -> Result<u32> {
    if !(temperature > 0.0) {
        return argmax(logits);
    }
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > f32::NEG_INFINITY)
        .map(|(i, &v)| (i as u32, v / temperature))
        .collect();
    if candidates.iter().any(|(_, v)| v.is_nan()) {
        return Err(Error::Backend("NaN logits".into()));
    }
    if candidates.is_empty() {
        return Err(Error::Backend("every token is banned".into()));
    }
    // Highest first; ties by id so the order (and the draw) is deterministic.
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_k > 0 {
        candidates.truncate(top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut mass = 0.0;
        let keep = probs.iter().position(|p| {
            mass += p;
            mass >= top_p as f64
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        candidates.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for ((id, _), p) in candidates.iter().zip(&probs) {
        acc += p;
        if draw < acc {
            return Ok(*id);
        }
    }
    Ok(candidates.last().map(|c| c.0).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windowed_guard_bans_the_continuation_of_a_repeated_prefix() {
        let guard = RepeatGuard::Windowed { ngram: 3, window: 10, whitelist: vec![] };
        // ... 5 6 7 ... 5 6 → 7 would repeat "5 6 7".
        assert_eq!(guard.banned(&[], &[5, 6, 7, 1, 5, 6]), vec![7]);
        assert!(guard.banned(&[], &[5, 6]).is_empty());
        // Outside the window: no ban.
        let far = RepeatGuard::Windowed { ngram: 3, window: 3, whitelist: vec![] };
        assert!(far.banned(&[], &[5, 6, 7, 1, 2, 5, 6]).is_empty());
        // Whitelisted ids are never banned.
        let cells = RepeatGuard::Windowed { ngram: 2, window: 90, whitelist: vec![128821] };
        assert!(cells.banned(&[], &[9, 128821, 9]).is_empty());
    }

    #[test]
    fn whole_sequence_guard_sees_the_prompt() {
        let guard = RepeatGuard::WholeSequence { ngram: 3 };
        assert_eq!(guard.banned(&[1, 2, 3, 4], &[1, 2]), vec![3]);
        assert!(RepeatGuard::Windowed { ngram: 3, window: 90, whitelist: vec![] }.banned(&[1, 2, 3, 4], &[1, 2]).is_empty());
        assert!(guard.banned(&[1], &[2]).is_empty());
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_rejects_nan() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]).unwrap(), 1);
        assert!(argmax(&[0.0, f32::NAN]).is_err());
        assert!(argmax(&[f32::NEG_INFINITY; 3]).is_err());
    }

    #[test]
    fn sampling_is_deterministic_for_a_seed_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20).map(|_| sample(&logits, 0.8, 5, 0.95, &mut rng).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let mut top5: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        top5.sort_by(|a, b| b.1.total_cmp(&a.1));
        let allowed: Vec<u32> = top5[..5].iter().map(|(i, _)| *i as u32).collect();
        assert!(draw(3).iter().all(|t| allowed.contains(t)));
        // top_p small enough keeps only the best token.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample(&logits, 1.0, 0, 1e-6, &mut rng).unwrap(), top5[0].0 as u32);
    }
}
