// Uses every public member of the package with its declared types; `tsc --noEmit` must accept it,
// and the @ts-expect-error lines must stay errors.
import { Dsocr, DsocrError } from 'dsocr';
import type {
  AdapterInfo, Block, DsocrErrorCode, ImageInput, LoadOptions, LoadProgress, Mode, OcrResult, RecognizeOptions, Support, Task, TokenEvent,
} from 'dsocr';

export async function sample(file: File, canvas: HTMLCanvasElement): Promise<string> {
  const support: Support = await Dsocr.isSupported();
  if (!support.ok) return `${support.code}: ${support.reason}`;
  const f16: boolean | undefined = support.shaderF16;
  const controller = new AbortController();
  const options: LoadOptions = {
    weightsUrl: new URL('https://example.org/dsocr-tiny-q4/'),
    quantize: 'q4',
    dtype: f16 ? 'f16' : 'f32',
    maxBindingBytes: 128 << 20,
    worker: true,
    wasmUrl: '/assets/dsocr_bg.wasm',
    cache: 'opfs',
    stallTimeoutMs: 10_000,
    warmup: true,
    signal: controller.signal,
    onProgress: (p: LoadProgress) => {
      const phase: 'download' | 'verify' | 'quantize' | 'upload' | 'compile' | 'ready' = p.phase;
      const eta: number | null = p.etaSeconds;
      console.log(phase, p.file, p.loaded, p.total, p.modelLoaded, p.modelTotal, p.bytesPerSecond, eta, p.fromCache, p.elapsedMs);
    },
  };
  await using engine = await Dsocr.load(options);
  const adapter: AdapterInfo = engine.adapterInfo();
  const task: Task = 'locate=the title';
  const mode: Mode = 'small';
  const recognize: RecognizeOptions = {
    task, mode, maxNewTokens: 256, repeatGuard: 'vllm', signal: controller.signal,
    onToken: (t: TokenEvent) => console.log(t.id, t.text, t.index),
  };
  const inputs: ImageInput[] = [file, canvas, 'page.png', new URL('https://example.org/p.png'), new Uint8Array(4)];
  const result: OcrResult = await engine.recognize(inputs[0], recognize);
  const blocks: Block[] = result.blocks;
  const model: 'deepseek-ocr' | 'deepseek-ocr-2' = result.model;
  const box: [number, number, number, number] | undefined = blocks[0]?.boxes[0];
  const stream = engine.stream(canvas, { task: 'free', mode: 'tiny' });
  for await (const token of stream) console.log(token.text);
  const streamed: OcrResult = await stream.result;
  try {
    await engine.recognize(file);
  } catch (e) {
    if (e instanceof DsocrError) {
      const code: DsocrErrorCode = e.code;
      console.log(code, e.message);
    }
  }
  await engine.dispose();
  // @ts-expect-error: not a mode
  const wrong: Mode = 'huge';
  // @ts-expect-error: weightsUrl is required
  const missing: LoadOptions = {};
  console.log(model, wrong, missing, box, adapter.maxTensorBytes, streamed.finish_reason, result.timings_ms.decode);
  return result.markdown;
}
