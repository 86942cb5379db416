// An app-owned worker that can destroy the engine's GPU device on request (a driver reset, a GPU
// process crash), for DEVICE_LOST.
import '/node_modules/dsocr/dist/worker.js';

const devices = [];
const requestDevice = GPUAdapter.prototype.requestDevice;
GPUAdapter.prototype.requestDevice = async function (descriptor) {
  const device = await requestDevice.call(this, descriptor);
  devices.push(device);
  return device;
};
self.addEventListener('message', (event) => {
  if (event.data?.loseDevice) for (const device of devices) device.destroy();
});
