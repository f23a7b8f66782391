// A C entry point to the ExecuTorch runtime that the executorch wheel ships as plain shared libraries
// (libexecutorch, the XNNPACK delegate, the optimized and quantized kernels), so that Python can run a
// .pte program through ctypes without importing torch: the wheel's own Python bindings link libtorch.
// These are the calls an Android or iOS app makes through ExecuTorch's Java or Swift API.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/extension/threadpool/threadpool_guard.h>

namespace executorch::extension::threadpool {
// declared here: the wheel ships the library but not threadpool.h
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::BufferDataLoader;
using executorch::extension::Module;
using executorch::runtime::EValue;

namespace {

struct Program {
  std::vector<uint8_t> bytes;  // the program's bytes, owned here for the module's lifetime
  std::unique_ptr<Module> module;
  std::vector<EValue> outputs;
  int threads = 1;
};

void set_error(char* err, size_t len, const std::string& message) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, message.c_str(), len - 1);
    err[len - 1] = '\0';
  }
}

}  // namespace

extern "C" {

// Loads the program from `size` bytes at `data` (copied) and its "forward" method; NULL and a message on failure.
void* earlin_et_load(const void* data, size_t size, int threads, char* err, size_t errlen) {
  auto program = std::make_unique<Program>();
  program->bytes.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + size);
  program->threads = threads;
  program->module = std::make_unique<Module>(
      std::make_unique<BufferDataLoader>(program->bytes.data(), program->bytes.size()));
  // the flatbuffer verifier first: every offset and size in the program inside its bytes (a crafted .pte read
  // out of bounds otherwise); Minimal, the default, checks the header only
  const auto verified = program->module->load(executorch::runtime::Program::Verification::InternalConsistency);
  if (verified != executorch::runtime::Error::Ok) {
    set_error(err, errlen, "the program failed ExecuTorch's verification (error " +
                               std::to_string(static_cast<int>(verified)) + "): not a well-formed ExecuTorch program");
    return nullptr;
  }
  const auto status = program->module->load_method("forward");
  if (status != executorch::runtime::Error::Ok) {
    set_error(err, errlen, "the program's forward method did not load (error " +
                               std::to_string(static_cast<int>(status)) +
                               "): an operator or delegate this runtime lacks, or not an ExecuTorch program");
    return nullptr;
  }
  if (threads > 1) {
    auto* pool = executorch::extension::threadpool::get_threadpool();
    if (pool != nullptr) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  }
  return program.release();
}

// Runs forward on one contiguous float32 tensor of `ndim` sizes; the number of outputs, or -1 and a message.
int earlin_et_run(void* handle, const float* input, const int64_t* sizes, int ndim, char* err, size_t errlen) {
  auto* program = static_cast<Program*>(handle);
  std::vector<executorch::aten::SizesType> shape(sizes, sizes + ndim);
  auto tensor = executorch::extension::from_blob(const_cast<float*>(input), shape, ScalarType::Float);
  // one thread: XNNPACK runs on the calling thread without the shared pool
  std::unique_ptr<executorch::extension::threadpool::NoThreadPoolGuard> guard;
  if (program->threads <= 1) guard = std::make_unique<executorch::extension::threadpool::NoThreadPoolGuard>();
  auto result = program->module->forward(tensor);
  if (!result.ok()) {
    set_error(err, errlen, "forward failed (error " + std::to_string(static_cast<int>(result.error())) +
                               "): the input does not match the program's shape or dtype");
    return -1;
  }
  program->outputs = std::move(result.get());
  return static_cast<int>(program->outputs.size());
}

// Output `i` of the last run: dtype code (ScalarType), sizes (at most 8), data pointer and byte count.
int earlin_et_output(void* handle, int i, int* dtype, int* ndim, int64_t* sizes, const void** data, size_t* nbytes) {
  auto* program = static_cast<Program*>(handle);
  if (i < 0 || i >= static_cast<int>(program->outputs.size()) || !program->outputs[i].isTensor()) return -1;
  const auto& tensor = program->outputs[i].toTensor();
  if (tensor.dim() > 8) return -1;
  *dtype = static_cast<int>(tensor.scalar_type());
  *ndim = static_cast<int>(tensor.dim());
  for (int d = 0; d < tensor.dim(); ++d) sizes[d] = tensor.size(d);
  *data = tensor.const_data_ptr();
  *nbytes = tensor.nbytes();
  return 0;
}

void earlin_et_free(void* handle) { delete static_cast<Program*>(handle); }

}  // extern "C"
