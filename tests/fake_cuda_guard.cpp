// A device guard for "cuda:0" in a CPU-only PyTorch build (tests/fake_cuda.py). PyTorch asks the CUDA device guard
// for the current device and stream before it dispatches some operations (Tensor.to, copy_); a CPU-only build has
// none and refuses them. This one says: one device, index 0, default stream, and does nothing else. Loading it
// changes nothing for CPU tensors: only operations naming a CUDA device ever ask for it.
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

struct FakeCudaGuard final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return Device(DeviceType::CUDA, 0); }
  Device getDevice() const override { return Device(DeviceType::CUDA, 0); }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device) const noexcept override { return Stream(Stream::DEFAULT, Device(DeviceType::CUDA, 0)); }
  Stream exchangeStream(Stream s) const noexcept override { return s; }
  DeviceIndex deviceCount() const noexcept override { return 1; }
};

C10_REGISTER_GUARD_IMPL(CUDA, FakeCudaGuard);

}  // namespace
