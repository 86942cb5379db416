// An app-owned worker whose storage reports 1 MB of quota (a full disk), for QUOTA_EXCEEDED.
import '/node_modules/dsocr/dist/worker.js';

StorageManager.prototype.estimate = async () => ({ quota: 1_000_000, usage: 0 });
