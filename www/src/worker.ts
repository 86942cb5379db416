// The Web Worker entry (`dsocr/worker`): serves the engine to the page that created it. An app that
// builds its own worker imports this module in it and passes that Worker as `Dsocr.load({ worker })`.
// Static imports only, no top-level await: it bundles as an iife or an ES module alike.

import { serve } from './host.js';

serve(self as unknown as import('./protocol.js').Endpoint);
