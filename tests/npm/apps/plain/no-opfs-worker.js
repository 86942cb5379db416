// An app-owned worker without the Origin Private File System (as in some private windows and older
// engines): the package's cache falls back to Cache Storage.
import '/node_modules/dsocr/dist/worker.js';

delete StorageManager.prototype.getDirectory;
