// An app-owned worker whose cache writes fail after 3 MB (a disk that fills up mid-download).
import '/node_modules/dsocr/dist/worker.js';

let written = 0;
const write = FileSystemSyncAccessHandle.prototype.write;
FileSystemSyncAccessHandle.prototype.write = function (buffer, options) {
  written += buffer.byteLength;
  if (written > 3_000_000) throw new DOMException('the disk is full', 'QuotaExceededError');
  return write.call(this, buffer, options);
};
