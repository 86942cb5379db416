// A stock webpack 5 production build: no wasm or worker configuration of its own.
const path = require('node:path');
module.exports = {
  mode: 'production',
  context: __dirname,
  entry: './main.js',
  output: { path: process.env.DSOCR_WEBPACK_OUT, filename: 'main.js', clean: true },
  performance: { hints: false },
};
