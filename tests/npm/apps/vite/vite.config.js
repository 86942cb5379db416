// DSOCR_VITE_EXCLUDE=1: the `optimizeDeps.exclude` users add for wasm packages; without it, Vite's
// dev pre-bundling moves the package's JavaScript and the package must still find its worker and wasm.
export default {
  root: import.meta.dirname,
  logLevel: 'warn',
  optimizeDeps: process.env.DSOCR_VITE_EXCLUDE ? { exclude: ['dsocr'] } : {},
  server: { fs: { strict: false } },
  build: { outDir: process.env.DSOCR_VITE_OUT, emptyOutDir: true },
};
